"""Models: ResNet v1 encoder, projection head, linear classifier, the two assembled networks
(`networks`), and the factories that build them from a config (`factory`)."""

from fnc_jax.models.heads import LinearClassifier, ProjectionHead
from fnc_jax.models.networks import ClassifierModel, ContrastiveModel
from fnc_jax.models.resnet import ResNet, resnet_feature_dim

__all__ = [
    "ClassifierModel",
    "ContrastiveModel",
    "LinearClassifier",
    "ProjectionHead",
    "ResNet",
    "resnet_feature_dim",
]
