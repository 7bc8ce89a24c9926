"""tokensieve.eval."""
