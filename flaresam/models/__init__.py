"""Models: SAM/HQ-SAM (segment-anything-hq), U-Net/DeepLabV3+ (smp), and the checkpoint registry."""
