"""Volume inference: a CT in, a FLARE22-labelled volume out, with its geometry.

A trained model (a :class:`~flaresam.models.base.ModelStep`) predicts axial
slices; this module decides which slices, with which box prompts, and in which
batches, then assembles the label volume in canonical orientation. Writing it
back with the scan's exact geometry is :func:`flaresam.io.write_label`'s job.

Prompt sources for the prompted (SAM-family) models:

* :class:`LabelPrompts` - per-slice tight boxes from an existing segmentation
  (the study's evaluation protocol; also refines a coarse segmentation);
* :class:`BoxPrompts` - one 3D box per organ (``boxes.json``): the box's middle
  slice uses the box, the slices above and below take their box from the
  previous slice's prediction, inside the box's slice range (MedSAM's 3D
  inference);
* :class:`ProposerPrompts` - fully automatic: a dense model segments first,
  each organ keeps its largest 3D component, and its per-slice boxes prompt the
  SAM model, which refines them.

Dense models need no prompts. Slices run in batches, so memory stays bounded
on large scans, and the frozen encoder runs once per slice however many
prompts the slice has.

Modules (importing this package loads none of them), in import order:
``prompts`` (the prompt sources, ``boxes.json``) -> ``volume`` (slices in
batches to a label volume, organ statistics) -> ``model`` (a run, checkpoint
or official file as a model; provenance) -> ``runner`` (``flaresam predict``:
files in, files out).
"""
