"""The HTTP inspection service (`iadgpt serve`): see `iadgpt.serving.app`."""

from .app import MicroBatcher, ServeSettings, create_app

__all__ = ["MicroBatcher", "ServeSettings", "create_app"]
