"""tokensieve.models."""
