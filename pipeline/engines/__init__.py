from pipeline.engines.evaluator import ELBOEvaluator
from pipeline.engines.trainer import CeVAETrainer

__all__ = ["CeVAETrainer", "ELBOEvaluator"]
