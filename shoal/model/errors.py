class ModelError(Exception):
    """Base of every error raised while loading or configuring a model."""


class ModelFileError(ModelError):
    """A model file is missing, unreadable or corrupt."""


class ChatTemplateError(ModelError):
    """The chat template is missing or raised while rendering."""


class UnsupportedModelError(ModelError):
    """The config asks for an architecture or feature shoal does not implement."""


class WeightShapeError(ModelError):
    """A tensor in the checkpoint does not have the shape the config implies."""
