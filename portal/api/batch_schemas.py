"""The Files and Batches API's requests and answers (OpenAI's shapes), as portal/api/schemas.py's models are the rest
of the API's: the routes (portal/api/batches.py) check requests against them and the OpenAPI description shows them."""
from __future__ import annotations

from typing import Annotated, Dict, List, Literal, Optional

from pydantic import BaseModel, BeforeValidator, Field

from ..validation import Query, Strict
from .schemas import Answer, _digits

MetadataValue = Annotated[str, Field(max_length=512)]


class BatchBody(Strict):
    """OpenAI's batch request; `metadata` may carry Pilotfish's options (portal/batches/batches.py)."""
    input_file_id: str = Field(max_length=40, description="the id of a file uploaded with purpose batch")
    endpoint: str = Field(max_length=64, description="/v1/chat/completions, /v1/completions, /v1/embeddings, "
                                                      "/v1/audio/transcriptions or /v1/audio/translations")
    completion_window: str = Field(max_length=16, description="a duration such as 24h (OpenAI's), 90m or 7d")
    metadata: Optional[Dict[Annotated[str, Field(max_length=64)], MetadataValue]] = Field(
        None, max_length=16, description="up to 16 strings by name; Pilotfish reads tier, time (minutes per task), "
                                         "partition, shard_size, concurrency and engine_args")


class FolderBody(Strict):
    """A folder of audio to transcribe into a mirror tree (portal/batches/folders.py), run as a batch."""
    folder: str = Field(max_length=4096, description="an absolute path of a folder the portal's user can read")
    model: str = Field(max_length=300, description="a speech-recognition (Whisper) model of the inventory")
    out: str = Field(max_length=4096, description="an absolute path of the output folder (made if missing), not "
                                                  "inside `folder`")
    format: Literal["srt", "vtt", "json", "txt"] = Field("txt", description="each transcript's format and extension")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="translate: into English")
    language: Optional[str] = Field(None, max_length=16, description="the audio's language code (e.g. en)")
    prompt: Optional[str] = Field(None, max_length=4000, description="Whisper's initial prompt")
    temperature: Optional[float] = Field(None, ge=0, le=1)
    completion_window: str = Field("24h", max_length=16, description="a duration such as 24h, 90m or 7d")
    metadata: Optional[Dict[Annotated[str, Field(max_length=64)], MetadataValue]] = Field(
        None, max_length=16, description="Pilotfish's options as for a batch: tier, time (minutes per task), "
                                         "partition, engine_args")


class ListQuery(Query):
    limit: Annotated[int, Field(ge=1, le=10000), BeforeValidator(_digits)] = Field(
        20, description="at most this many (1 to 10000)")
    after: Optional[str] = Field(None, max_length=40, description="the id after which to list (the last one seen)")


class FilesQuery(ListQuery):
    limit: Annotated[int, Field(ge=1, le=10000), BeforeValidator(_digits)] = Field(
        10000, description="at most this many (1 to 10000)")
    purpose: Optional[str] = Field(None, max_length=32, description="batch, user_data or batch_output")
    order: Literal["asc", "desc"] = Field("desc", description="asc: oldest first; desc: newest first")


class FileUpload(BaseModel):
    """OpenAI's upload: the file and its purpose, as multipart/form-data."""
    file: bytes = Field(json_schema_extra={"format": "binary"}, description="a JSONL file of batch lines")
    purpose: Literal["batch", "user_data"] = Field(description="batch (a batch's input) or user_data (audio that "
                                                                "audio batch lines name by id)")


class FileObject(Answer):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str


class FileList(Answer):
    object: Literal["list"]
    data: List[FileObject]
    has_more: bool


class FileDeleted(Answer):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(Answer):
    total: int
    completed: int
    failed: int


class BatchObject(Answer):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: Optional[str]
    error_file_id: Optional[str]
    created_at: int
    request_counts: RequestCounts
    metadata: Optional[Dict[str, str]]


class BatchList(Answer):
    object: Literal["list"]
    data: List[BatchObject]
    has_more: bool
