"""tokensieve.train."""
