"""Hugging Face Trainer integration (``Trainer(optim="galore_adamw")``, layer-wise updates, ZO trainer).
Empty for now: it arrives with its own issue; until then use ``lowmem.create_optimizer`` and pass the
optimizer to ``Trainer(optimizers=(opt, None))``.
"""
