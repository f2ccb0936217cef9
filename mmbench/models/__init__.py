"""Models: encoders (backbones), fusion heads, the multimodal classifier."""
