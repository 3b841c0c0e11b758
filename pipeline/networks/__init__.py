from pipeline.networks.cevae import CeVAE, CeVAEReconstruction

__all__ = ["CeVAE", "CeVAEReconstruction"]
