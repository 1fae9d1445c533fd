"""Data: image preprocessing (``processing``), classification image folders with deterministic augmentation
(``folders``), segmentation mask folders (``masks``), the bundled digits (``digits``) and the shapes example
(``shapes``)."""
