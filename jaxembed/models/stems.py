"""The stems a backbone can start with, by name (`models.create(arch, stem=...)`, `--stem`).

"imagenet" is the published networks' 7x7 stride-2 convolution and max-pool: 1/4 of the input side
into ResNet's stage 1 (1/8 into BN-Inception's inception_3a), which leaves a 1x1 map at the end of a
32 px image. The small stems replace both by one 3x3 convolution of this stride and no max-pool:
"small" keeps the full resolution (the most accurate at 32 px, and ~16x the ImageNet stem's cost),
"small_s2" halves it (~4x the cost: for 64 px images, or 32 px on a compute budget).
"""

SMALL_STEM_STRIDES = {"small": 1, "small_s2": 2}
STEMS = ("imagenet", *SMALL_STEM_STRIDES)
