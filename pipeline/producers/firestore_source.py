"""Firestore access for the producers: settings, the client, queries and paging.

Three ways in, in this order: a service-account JSON (`--firebase-config`,
project from the file), the emulator (FIRESTORE_EMULATOR_HOST, anonymous
credentials), or Application Default Credentials.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.producers.documents import UPSERT, DocChange, Layout

logger = logging.getLogger(__name__)

EMULATOR_DEFAULT_PROJECT = "demo-facematch"


class ConfigError(RuntimeError):
    """Firestore cannot be reached as configured (no credentials, no project)."""


class FirestoreSettings(BaseSettings):
    """Where the photos live (FACEMATCH_FIRESTORE_*)."""

    model_config = SettingsConfigDict(env_prefix="FACEMATCH_FIRESTORE_", frozen=True, populate_by_name=True)

    project: str | None = Field(
        default=None, validation_alias=AliasChoices("FACEMATCH_FIRESTORE_PROJECT", "GOOGLE_CLOUD_PROJECT"))
    credentials_file: Path | None = None  # a Firebase service-account JSON
    events_collection: str = "events"
    photos_collection: str = "photos"
    page_size: int = 300
    max_batch: int = 500  # changes published per checkpoint (the at-least-once window)

    @property
    def layout(self) -> Layout:
        """Collection names for the pure core."""
        return Layout(events=self.events_collection, photos=self.photos_collection)


def make_client(settings: FirestoreSettings) -> Any:
    """A google.cloud.firestore.Client for the configured project."""
    if settings.credentials_file:
        return _firebase_client(settings.credentials_file, settings.project)
    from google.cloud import firestore

    if os.environ.get("FIRESTORE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        # firebase_admin.initialize_app() + firestore.client() still looks for
        # default credentials with the emulator set; a plain client does not.
        project = settings.project or EMULATOR_DEFAULT_PROJECT
        logger.info("firestore: emulator %s, project %s", os.environ["FIRESTORE_EMULATOR_HOST"], project)
        return firestore.Client(project=project, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    logger.info("firestore: application default credentials, project %s", settings.project or "(from ADC)")
    try:
        return firestore.Client(project=settings.project)
    except Exception as exc:  # DefaultCredentialsError, or no project in the credentials
        raise ConfigError(f"no Firestore credentials ({exc}); pass --firebase-config FILE, "
                          "or set FIRESTORE_EMULATOR_HOST for the emulator") from exc


def _firebase_client(path: Path, project: str | None) -> Any:
    import firebase_admin
    from firebase_admin import credentials, firestore

    cred = credentials.Certificate(str(path))
    project = project or cred.project_id
    # A named app: tests and tools may build several clients in one process.
    app = firebase_admin.initialize_app(cred, {"projectId": project}, name=f"facematch-{uuid.uuid4().hex[:8]}")
    logger.info("firestore: service account %s, project %s", cred.service_account_email, project)
    return firestore.client(app)


def photos_query(client: Any, settings: FirestoreSettings, event_id: str | None = None) -> Any:
    """One event's photos collection, or the collection group of every 'photos'."""
    if event_id is None:
        return client.collection_group(settings.photos_collection)
    return client.collection(settings.events_collection).document(event_id).collection(settings.photos_collection)


def iter_pages(query: Any, page_size: int, order_field: str = "__name__") -> Iterator[list[Any]]:
    """Pages of document snapshots, with a cursor so each read resumes after the last document."""
    # Ordering by a field then the name gives a total order, so start_after
    # neither skips nor repeats documents that share a value.
    ordered = query.order_by(order_field) if order_field == "__name__" else \
        query.order_by(order_field).order_by("__name__")
    last = None
    while True:
        page_query = ordered.limit(page_size)
        if last is not None:
            page_query = page_query.start_after(last)
        page = list(page_query.stream())
        if page:
            yield page
        if len(page) < page_size:
            return
        last = page[-1]


def count(query: Any) -> int | None:
    """Server-side count (one aggregation read); None where unsupported."""
    try:
        result = query.count().get()
        return int(result[0][0].value)
    except Exception as exc:  # older servers or emulators: the bar just has no total
        logger.info("count aggregation unavailable (%s); progress has no total", exc)
        return None


def to_ms(value: Any) -> int:
    """Firestore timestamps (datetime) as epoch milliseconds."""
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    return 0


def snapshot_change(snapshot: Any) -> DocChange:
    """A DocumentSnapshot as the core's upsert DocChange."""
    return DocChange(kind=UPSERT, path=snapshot.reference.path, data=snapshot.to_dict() or {},
                     update_ms=to_ms(snapshot.update_time))
