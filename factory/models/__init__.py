"""Local machine-learning models the Factory runs itself (no torch, no network at run time).

``factory.models.files`` finds and pulls model files; ``factory.models.minilm`` runs
all-MiniLM-L6-v2 with numpy. Import those modules directly: this package keeps
``import factory`` free of numpy.
"""
