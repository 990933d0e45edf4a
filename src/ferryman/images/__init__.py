"""VM images: what an image is signed as (:mod:`~ferryman.images.signing`) and where its bytes live
(:mod:`~ferryman.images.store`, content-addressed by SHA-256)."""
