"""tokensieve.data."""
