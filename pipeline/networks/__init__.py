from pipeline.networks.cevae import ARCHITECTURE_KEYS, CeVAE, CeVAEReconstruction

__all__ = ["ARCHITECTURE_KEYS", "CeVAE", "CeVAEReconstruction"]
