"""Evaluation of a trained ceVAE on a labelled test datalist: the paper's numbers, and what a user without labels
would get.

:class:`AnomalyEvaluation` scores each test volume (:class:`pipeline.anomaly_map.AnomalyMap`: one forward and one
batched KL-gradient backward per slice batch), derives the pixel maps of every option set (``paper``,
``authors``, ``postprocessed``: :data:`pipeline.scoring.OPTION_SETS`) and keeps brain voxels only as compact
arrays. Then, per option set and score:

* slice level: AUROC/AUPRC of slice scores over the slices training would use (``min_brain_fraction``,
  ``border_slices``; normal: no annotated pixel, anomalous: more than ``min_slice_pixels``);
* pixel level: exact AUROC/AUPRC over brain voxels (:class:`pipeline.metrics.ThresholdCurve`) beside the lesion
  prevalence (the AUPRC of a random score); with ``label_groups`` also per group of label values;
* Dice, each beside the Dice of segmenting the whole brain: ``dice_split`` (threshold chosen on a seeded 20 % of the
  test **subjects**, Dice on the other 80 %, as in the paper), ``dice_healthy`` (at each healthy-data threshold of
  ``threshold.json``: no labels involved) and ``dice_best`` (the best threshold; an upper bound, not a result).
  A threshold whose segmentation covers more than half of the brain is flagged (``covers_over_half_brain``,
  ``warnings``, the log): its Dice is that of a whole-brain mask;
* ``lesion_detection``: the fraction of 3D lesion components that the segmentation touches (``recall``) and the
  segmented components touching no lesion per volume (``fp_per_volume``), at the calibrated threshold (held-out
  subjects) and at the default healthy threshold (all subjects);
* ``ci95``: 95 % bootstrap intervals over subjects of the pixel AUROC/AUPRC and of the Dice;
* posterior collapse: the 0.95-quantile of the per-slice KL (summed, and per latent dimension), active latent units.

Outputs in ``output_dir``: ``metrics.json``, ``per_subject.csv`` (per-subject AUROC, AUPRC and Dice), ``curves.json``
(pixel ROC and PR curves on fixed grids), ``roc_pr.png``, ``panels.png`` (with the segmentation that inference makes
by default). The calibrated thresholds are added to ``threshold.json`` next to the checkpoint under this test set's
name (:mod:`pipeline.thresholds`); the healthy ones are read from there, or computed from the healthy validation
subjects when the file is missing or was made for another checkpoint. Metrics are logged to MLflow as
``<name>/<option set>/<metric>/<score>`` (e.g. ``eval/paper/pixel_auroc/combined``) and ``<name>/<metric>``, files
under the artifact folder ``evaluation/<name>``; ``name`` tells test sets apart.

Modules: :mod:`~pipeline.evaluation.core` (scoring, the test split, outputs), :mod:`~pipeline.evaluation.settings` (what
an evaluation is told: the labelled set, the reporting, the default segmentation),
:mod:`~pipeline.evaluation.option_set_metrics` (the metrics of one option set: pure functions, run side by side in
threads), :mod:`~pipeline.evaluation.subjects`
(what is kept of each subject), :mod:`~pipeline.evaluation.segmentation` (Dice, best threshold, lesion detection:
pure functions of the subjects), :mod:`~pipeline.evaluation.report` (curves, per-subject table),
:mod:`~pipeline.evaluation.figures`, :mod:`~pipeline.evaluation.mlflow_report`.
"""

from pipeline.evaluation.core import AnomalyEvaluation
from pipeline.evaluation.settings import DefaultSegmentation, LabelledSet, Reporting

__all__ = ["AnomalyEvaluation", "DefaultSegmentation", "LabelledSet", "Reporting"]
