"""The MMDiT, its encoders, the rectified-flow objective, sampling and the distributed trainer."""
