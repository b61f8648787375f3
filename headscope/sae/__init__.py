"Sparse autoencoders: architectures behind a small registry, SAELens-format checkpoints"
