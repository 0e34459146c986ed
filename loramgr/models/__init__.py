"""Building and loading the torch models a base is exported from."""
