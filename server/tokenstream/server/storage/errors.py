"""Errors raised by repositories; the engine translates them into domain errors."""


class StorageError(Exception):
    """Base class of repository errors."""


class NotFound(StorageError):
    """The stream or conversation does not exist."""


class AlreadyExists(StorageError):
    """A unique key (stream id, conversation id or request id) is already taken."""


class StorageUnavailable(StorageError):
    """The database could not be reached or was busy; the same call may succeed later."""
