"""Package data: CLIP ViT-L/14's BPE merges (see README.md here for provenance and license)."""
