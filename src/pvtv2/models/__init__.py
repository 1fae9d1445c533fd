"""The PVTv2 models: the configuration, the reference layers, the encoder and its task models.

- ``config``: :class:`PvtV2Config` and the published variants (``PRESETS``);
- ``activations``: the Mix-FFN activations a config may name;
- ``layers``: the building blocks (patch embedding, spatial-reduction attention, Mix-FFN, block, stage), written with
  public PyTorch ops, one forward each; the fast inference path (:mod:`pvtv2.fast`) takes over at one point in
  ``PvtV2Stage.forward``;
- ``modeling``: ``PvtV2Model``, ``PvtV2ForImageClassification``, ``PvtV2Backbone`` and their common base;
- ``segmentation``, ``depth``: SegFormer's and GLPN's heads on the encoder;
- ``outputs``, ``labels``: output containers and the ImageNet class names.

Only the top-level model classes read the config; layers take plain numbers.
"""
