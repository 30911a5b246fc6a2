"""Data side: synthetic multilingual world, tiny tokenizer, chat templates, LLaVA-format datasets.

Kept import-light on purpose: import the submodule you need (`parrot.data.datasets`, `parrot.data.templates`,
`parrot.data.synthetic`, ...) rather than pulling torch/transformers in through this package.
"""
