"""Train (or reuse) several models on one split and report them side by side on held-out test cases.

This is the study's Table 1 and Figure 5 from one command, and a fairer
version of it:

* three disjoint sets of cases: the models train on ``train``; ``val`` picks
  each run's best epoch and the box proposer of the automatic rows; every
  reported number is measured on ``test``, on which nothing was chosen;
* baselines that every SAM number is read against: the ground-truth box filled
  (no model at all), and zero-shot SAM and HQ-SAM (the checkpoint before
  fine-tuning) with the same boxes;
* the study's 2D Dice and the FLARE22 DSC/NSD on whole test volumes, one
  definition each (:data:`flaresam.metrics.METRICS`, docs/protocols.md);
* SAM a second time with *automatic* boxes from the dense model that did best
  on the validation cases, so the table shows what the oracle boxes buy;
* the study's published figures as labelled reference rows.

SAM models are decoded on the whole frame, as ``SamPredictor`` computes them
(box-window decoding is a speed option of ``predict`` only). A finished run
under ``runs`` whose dataset, split and settings match is reused, so a re-run
re-evaluates without retraining.

The modules import downward only, and this package imports none of them:

* :mod:`flaresam.compare.plan`: the plan, its defaults resolved, split, training configs, run reuse;
* :mod:`flaresam.compare.scoring`: rows, predictors, scoring over the test cases;
* :mod:`flaresam.compare.report`: provenance, results.json, CSV, Markdown, figures, the console table;
* :mod:`flaresam.compare.runner`: :func:`~flaresam.compare.runner.run_compare`, the steps in order.
"""
