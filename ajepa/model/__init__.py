from ajepa.model.ajepa import AJEPA
from ajepa.model.predictor import Predictor
from ajepa.model.vit import ViTEncoder, sincos_pos_embed

__all__ = ["AJEPA", "Predictor", "ViTEncoder", "sincos_pos_embed"]
