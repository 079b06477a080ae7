"""An OpenAI-compatible inference server seen from opdx: requests with a timeout and bounded
retries (urllib3's ``Retry``: a connection error or a 5xx answer is tried again, with backoff), the
model it serves, and the check that its tokenizer is the pair's. The served teacher
(``opdx.backends.server``) and the served student (``opdx.backends.student_server``) talk through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from transformers import PreTrainedTokenizerBase
from urllib3.util.retry import Retry

from opdx.backends import ServerError
from opdx.compat import TOKENIZER_PROBES


class ServerClient:
    """Requests to the server at ``url`` (``http://host:port/v1``) for the config group ``group``
    (``teacher`` or ``rollout``, which messages name with its ``url`` and ``model`` options):
    ``timeout`` seconds each, ``retries`` more tries, ``concurrency`` at once (``map``)."""

    def __init__(self, url: str, group: str, timeout: float, retries: int, concurrency: int = 8) -> None:
        self.url, self.group = url.rstrip("/"), group
        self.timeout, self.concurrency = timeout, concurrency
        self.session = requests.Session()
        retry = Retry(
            total=retries,
            backoff_factor=0.5,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=None,
            raise_on_status=False,  # the last error answer is reported with its text
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))
        self.session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))

    @property
    def root(self) -> str:
        """The server's address without the API's ``/v1``."""
        return self.url.removesuffix("/v1")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, root: bool = False) -> Any:
        """One request to ``path`` under the API (``root``: under the server), its JSON answer;
        ServerError naming the URL when it fails after the retries (``status``: the HTTP status)."""
        base = self.root if root else self.url
        try:
            answer = self.session.request(method, base + path, json=body, timeout=self.timeout)
        except requests.RequestException as error:
            raise ServerError(
                f"{self.group}=server: no answer from {base + path} ({type(error).__name__}: {error}). Is the server "
                f"running and {self.group}.url={self.url} right?"
            ) from None
        if not answer.ok:
            status = f"{answer.status_code}: {answer.text[:500]}"
            raise ServerError(f"{self.group}=server: {base + path} answered {status}", answer.status_code)
        try:
            return answer.json()
        except ValueError:
            no_json = f"{base + path} answered with no JSON: {answer.text[:200]}"
            raise ServerError(f"{self.group}=server: {no_json}") from None

    def field(self, answer: Any, key: str, path: str) -> Any:
        """``answer[key]``, or ServerError naming the URL when the answer has no such field."""
        if not isinstance(answer, dict) or answer.get(key) is None:
            raise ServerError(
                f"{self.group}=server: {self.url}{path} answered without {key!r} (not vLLM's OpenAI-compatible API?): "
                f"{str(answer)[:200]}"
            )
        return answer[key]

    def map(self, path: str, bodies: Sequence[dict[str, Any]], root: bool = False) -> list[Any]:
        """Each body POSTed to ``path``, ``concurrency`` at a time; the answers in order."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda body: self.call("POST", path, body, root), bodies))

    def served_model(self, model: str | None) -> tuple[str, float]:
        """The name of the model to use (``model``; None: the one model the server lists) and its
        ``max_model_len`` (inf when not listed); ServerError when it is not served or ambiguous."""
        served = {entry["id"]: entry for entry in self.field(self.call("GET", "/models"), "data", "/models")}
        if model is None:
            if len(served) != 1:
                raise ServerError(
                    f"the server at {self.url} serves {len(served)} models ({', '.join(served)}): name one with "
                    f"{self.group}.model="
                )
            model = next(iter(served))
        if model not in served:
            raise ServerError(
                f"the server at {self.url} serves {', '.join(served)}, not {self.group}.model={model!r}: start it "
                f"with that model, or set {self.group}.model to the name it serves"
            )
        return model, served[model].get("max_model_len", math.inf)

    def check_tokenizer(self, model: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """The server's tokenizer must give ``tokenizer``'s ids on ``opdx.compat.TOKENIZER_PROBES``
        (vLLM's ``/tokenize``); a server without that endpoint is trusted with a note."""
        for probe in TOKENIZER_PROBES:
            body = {"model": model, "prompt": probe, "add_special_tokens": False}
            try:
                served = self.field(self.call("POST", "/tokenize", body, root=True), "tokens", "/tokenize")
            except ServerError as error:
                if error.status != 404:
                    raise
                print(f"{self.group}: {self.url} has no /tokenize: its tokenizer is not checked against the student's")
                return
            local = tokenizer.encode(probe, add_special_tokens=False)
            if served != local:
                raise ServerError(
                    f"the server at {self.url} serves {model} with another tokenizer than the student's: "
                    f"{probe!r} gives {served[:12]}... there and {local[:12]}... here; it must tokenize as the "
                    "student does"
                )
