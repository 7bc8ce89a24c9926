"""tokensieve.models.backbones."""
