"""Weights in and out: safe file reading (``files``), the key layouts of transformers, timm, the original authors,
SegFormer and GLPN as rename rules (``layouts``), hub resolution (``hub``), and loading into / saving from a model
(``loading``), which reads what it needs from the model class's attributes."""
