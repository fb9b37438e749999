"""Persistent VFX projects: a plate's frames and every stage's outputs, kept under one name so a
later job runs later stages on them.

Where a project lives: with a bucket (the job's `s3Config` or the BUCKET_* settings), under the
key prefix `projects/<project_name>/` (after BUCKET_KEY_PREFIX); else with OUTPUT_DIR, in
`OUTPUT_DIR/projects/<project_name>/`. Stages always read and write plain files in
`Project.root`: the OUTPUT_DIR folder itself, or (with a bucket) a local working copy that
`pull` fills from the bucket and `publish` uploads to it. With neither, nothing could persist,
so a project is refused with the settings to set.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.config import Settings
from core.errors import InvalidInput, UploadFailed
from core.naming import natural_key, safe_name, safe_name_error
from core.storage import ArtifactStore, BucketTarget, s3_client, sha256_of

PROJECTS_FOLDER = "projects"
FRAMES_DIR = "source/frames"
MANIFEST = "source/manifest.json"
PLATE_STEM = "source/plate"
"""The uploaded plate, kept as `source/plate.<ext>` (the web API's upload), so a job with no
`video` can still ingest it."""
FRAME_PATTERN = "frame_%04d.png"
"""As the seed's ffmpeg call names them: numbered from 1."""
MAX_PATH_PARTS = 8


def path_error(relative: str) -> str | None:
    """Why `relative` cannot name a file inside a project, or None: every part a safe name."""
    if not isinstance(relative, str) or not relative or len(relative) > 1024:
        return "must be a relative path inside the project"
    parts = PurePosixPath(relative).parts
    if len(parts) > MAX_PATH_PARTS or relative.startswith("/") or "\\" in relative:
        return f"{relative[:80]!r} is not a path inside the project"
    for part in parts:
        problem = safe_name_error(part)
        if problem:
            return problem
    return None


@dataclass(frozen=True)
class StoredFile:
    """One project file as a client reaches it."""

    path: str
    """Relative to the project's root (`roto/person/mask_0001.png`)."""
    bytes: int
    storage: str
    """`local` (under OUTPUT_DIR) or `s3`."""
    location: str
    """The absolute file path, or the object's key in the bucket."""


class Project:
    """One named project; see the module's docstring for where it is kept."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        bucket: BucketTarget | None,
        *,
        field: str = "project_name",
    ) -> None:
        self.name = safe_name(name, field)
        self.settings = settings
        self.bucket = bucket
        self._client: Any = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if bucket is not None:
            self.mode = "s3"
            work = settings.work_dir
            if work is not None:
                Path(work).mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.TemporaryDirectory(
                prefix=f"vfx-{self.name}-", dir=str(work) if work else None
            )
            self.root = Path(self._scratch.name)
            self._store = ArtifactStore(settings, PROJECTS_FOLDER, bucket)
        elif settings.output_dir is not None:
            self.mode = "local"
            self.root = Path(settings.output_dir) / PROJECTS_FOLDER / self.name
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            raise InvalidInput(
                "project_name: projects are kept in a bucket or under OUTPUT_DIR, and neither "
                "is set; set OUTPUT_DIR, or BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                "BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME (or send s3Config with the job)"
            )

    # -- paths ------------------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        """The local file for `relative` (created folders included); refuses unsafe paths."""
        problem = path_error(relative)
        if problem:
            raise InvalidInput(f"project file: {problem}")
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def folder(self, relative: str, *, empty: bool = False) -> Path:
        """The local folder `relative`; `empty` clears what an earlier run left there, so a
        rerun's outputs never mix with stale ones (in the bucket too, at `publish`)."""
        if empty:
            self.clear(relative)
        path = self.path(relative)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear(self, relative: str) -> None:
        """Remove the folder `relative` and everything kept under it (in the bucket too)."""
        path = self.path(relative)
        if path.is_dir():
            shutil.rmtree(path)
        if self.mode == "s3":
            self._delete_prefix(relative)

    def key(self, relative: str) -> str:
        assert self.bucket is not None
        prefix = self.bucket.key_prefix.strip("/")
        return "/".join(p for p in (prefix, PROJECTS_FOLDER, self.name, relative) if p)

    # -- what is kept -----------------------------------------------------------------------

    def frame_files(self) -> list[Path]:
        folder = self.root / FRAMES_DIR
        if not folder.is_dir():
            return []
        return sorted(folder.glob("frame_*.png"), key=lambda p: natural_key(p.name))

    def manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None

    def plate(self) -> Path | None:
        """The kept plate (`source/plate.<ext>`), if an upload left one."""
        folder = self.root / PurePosixPath(PLATE_STEM).parent
        if not folder.is_dir():
            return None
        found = sorted(folder.glob(PurePosixPath(PLATE_STEM).name + ".*"))
        return found[0] if found else None

    def list_files(self, prefix: str = "") -> list[StoredFile]:
        """Every file of the project (under `prefix`), in natural order: the bucket's objects,
        or OUTPUT_DIR's files."""
        if self.mode == "s3":
            return self._list_objects(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        found = []
        for path in sorted(base.rglob("*"), key=lambda p: natural_key(str(p))):
            if path.is_file():
                relative = path.relative_to(self.root).as_posix()
                found.append(StoredFile(relative, path.stat().st_size, "local", str(path)))
        return found

    # -- keeping files ----------------------------------------------------------------------

    def save(self, relative: str, data: bytes) -> Path:
        """Write one file into the project (and, with a bucket, upload it at once)."""
        path = self.path(relative)
        path.write_bytes(data)
        if self.mode == "s3":
            self._upload(relative, path)
        return path

    def remove(self, relative: str) -> None:
        """Delete one kept file (the local copy, and the bucket's object)."""
        path = self.path(relative)
        path.unlink(missing_ok=True)
        if self.mode == "s3":
            assert self.bucket is not None
            self._s3().delete_object(Bucket=self.bucket.bucket, Key=self.key(relative))

    def publish(self, relative: str) -> list[StoredFile]:
        """Make the files under `relative` (a file or a folder) persist: with a bucket,
        upload them; under OUTPUT_DIR they already are. What was kept."""
        base = self.root / relative
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        kept = []
        for path in files:
            name = path.relative_to(self.root).as_posix()
            if self.mode == "s3":
                self._upload(name, path)
                kept.append(StoredFile(name, path.stat().st_size, "s3", self.key(name)))
            else:
                kept.append(StoredFile(name, path.stat().st_size, "local", str(path)))
        return kept

    def describe(self, relative: str) -> dict[str, Any]:
        """One kept file as an artifact record (name, bytes, sha256, where)."""
        path = self.root / relative
        record: dict[str, Any] = {
            "name": relative,
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
        }
        if self.mode == "s3":
            assert self.bucket is not None
            record.update(
                {"storage": "s3", "bucket": self.bucket.bucket, "key": self.key(relative)}
            )
        else:
            record.update({"storage": "local", "path": str(path.resolve())})
        return record

    def pull(self, relative: str) -> int:
        """With a bucket: fetch the kept files under `relative` into the working copy (those
        not there yet); how many. Under OUTPUT_DIR they are already in place."""
        if self.mode != "s3":
            return 0
        fetched = 0
        client = self._s3()
        assert self.bucket is not None
        for item in self._list_objects(relative):
            target = self.root / item.path
            if target.is_file() and target.stat().st_size == item.bytes:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(self.bucket.bucket, item.location, str(target))
            except Exception as exc:  # botocore's errors: the message says which object
                raise UploadFailed(
                    f"could not read {item.location} from the bucket: {exc}"
                ) from exc
            fetched += 1
        return fetched

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    # -- the bucket -------------------------------------------------------------------------

    def _s3(self) -> Any:
        assert self.bucket is not None
        if self._client is None:
            self._client = s3_client(self.bucket, self.settings)
        return self._client

    def _upload(self, relative: str, path: Path) -> None:
        self._store.put(f"{self.name}/{relative}", path)

    def _list_objects(self, prefix: str) -> list[StoredFile]:
        assert self.bucket is not None
        base = self.key("")
        wanted = f"{base}/{prefix}".rstrip("/") + "/" if prefix else base + "/"
        found = []
        try:
            pages = self._s3().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket.bucket, Prefix=wanted):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(base) + 1 :]
                    if relative and path_error(relative) is None:
                        found.append(StoredFile(relative, int(item["Size"]), "s3", item["Key"]))
        except Exception as exc:  # botocore's errors: the message says what failed
            raise UploadFailed(f"could not list {wanted} in the bucket: {exc}") from exc
        return sorted(found, key=lambda f: natural_key(f.path))

    def _delete_prefix(self, relative: str) -> None:
        assert self.bucket is not None
        for item in self._list_objects(relative):
            self._s3().delete_object(Bucket=self.bucket.bucket, Key=item.location)
