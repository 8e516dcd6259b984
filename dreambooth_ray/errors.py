"""The errors a user can fix: the CLI prints them as one line that names the file or field, and exits 2."""


class UserError(Exception):
    """Base of every error that is the input's fault (spec, photos, model location, storage, cluster)."""
