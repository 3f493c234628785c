"""How attnpatch reaches a model's attention: the transformers AttentionInterface registry (`transformers`),
instance-level forward replacement for modules outside it (`module_forward`), and where models keep their attention
(`structure`)."""
