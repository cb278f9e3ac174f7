"""The own SigV4 presigner (orchestrator.storage.presign) against botocore: byte-identical URLs
for the same inputs and a frozen clock, the fallback to botocore for what it does not reproduce,
and a round trip through the moto server with URLs it signed."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.auth
import httpx
import pytest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.storage import presign, s3
from orchestrator.storage.presign import QueryPresigner, signing_hmac, signing_key
from orchestrator.storage.s3 import (
    JSON_CONTENT_TYPE,
    ensure_bucket,
    issue_storage_grant,
    orchestrator_s3,
    presign_get_urls,
    read_json_object,
    s3_client,
)

# botocore's SigV4 signers take the time from `botocore.auth.get_current_datetime` (naive UTC);
# the presigner from its clock. Both are frozen to this instant.
FROZEN = datetime(2026, 3, 14, 15, 9, 26)

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# STS tokens are long base64: '+', '/' and '=' all need encoding in a query string.
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+abc/def==" * 12

# (endpoint URL, region): AWS itself in two regions (botocore's "auto" addressing), a moto-like
# local server and an https endpoint on a bare host (path-style).
ENDPOINTS = [
    (None, "us-east-1"),
    (None, "eu-west-1"),
    ("http://127.0.0.1:5000", "us-east-1"),
    ("https://s3.storage.example.com", "eu-central-1"),
    ("https://Objects.Example.com:443/", "ap-southeast-2"),
    ("http://minio.local:9000", "us-west-2"),
]

KEYS = [
    "runs/ws/pipe/run1/v1/nodes/node/attempts/2/output.json",
    "k",
    "unicode/é/ß/日本語/😀/\u200b",
    "with space/and  two  spaces ",
    "plus+sign+",
    "tilde~/~",
    "percent%2Flooking%2fand%20%",
    "%",
    "%%41%zz",
    "eq=sign",
    "amp&ersand",
    "question?mark",
    "hash#fragment",
    "all = & ? # + ~ %2F",
    "semi;colon,comma:colon@at!bang$dollar'quote(paren)*star",
    'quote"<>|^`{}[]\\back',
    "ctrl\x00\x01\x1f\x7f",
    "tab\tnewline\ncr\r",
    "/leading",
    "trailing/",
    "double//slash",
    "//",
    "/",
    "///lead//and//trail//",
    ".",
    "..",
    "../up",
    "./here/./.",
    "a" * 1000,
    ("é/x " * 250)[:1000],
]

EXPIRIES = [1, 3600, 604800]


@pytest.fixture
def frozen_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: FROZEN)


_CLIENTS: dict[tuple[str | None, str, str | None], Any] = {}


def botocore_client(endpoint_url: str | None, region: str, token: str | None) -> Any:
    """A client as `orchestrator_s3` builds it (s3_client's config), with explicit credentials."""
    cache_key = (endpoint_url, region, token)
    if cache_key not in _CLIENTS:
        credentials = {"AccessKeyId": ACCESS_KEY, "SecretAccessKey": SECRET_KEY}
        if token is not None:
            credentials["SessionToken"] = token
        _CLIENTS[cache_key] = s3_client(endpoint_url, region, credentials)
    return _CLIENTS[cache_key]


def own_presigner(endpoint_url: str | None, region: str, token: str | None,
                  clock: Callable[[], datetime] = lambda: FROZEN.replace(tzinfo=UTC)) -> QueryPresigner:
    return QueryPresigner(
        region=region, endpoint_url=endpoint_url, addressing_style=s3._addressing_style(endpoint_url),
        credentials=Credentials(ACCESS_KEY, SECRET_KEY, token), clock=clock,
    )


def botocore_url(client: Any, method: str, bucket: str, key: str, expires: int,
                 content_type: str | None = JSON_CONTENT_TYPE) -> str:
    if method == "GET":
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )
    else:
        params = {"Bucket": bucket, "Key": key}
        if content_type is not None:
            params["ContentType"] = content_type
        url = client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires)
    return url


def own_url(presigner: QueryPresigner, method: str, bucket: str, key: str, expires: int,
            content_type: str | None = JSON_CONTENT_TYPE) -> str:
    if method == "GET":
        return presigner.presign_get(bucket, key, expires)
    return presigner.presign_put(bucket, key, expires, content_type=content_type)


# --- byte-identical to botocore ------------------------------------------------------------------


@pytest.mark.usefixtures("frozen_botocore")
@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("token", [None, SESSION_TOKEN], ids=["no-token", "session-token"])
@pytest.mark.parametrize(("endpoint_url", "region"), ENDPOINTS)
def test_identical_to_botocore(endpoint_url: str | None, region: str, token: str | None, method: str) -> None:
    client = botocore_client(endpoint_url, region, token)
    presigner = own_presigner(endpoint_url, region, token)
    buckets = ["tickweave-outputs", "a1b", "x" * 63]
    if endpoint_url is not None:
        buckets.append("my.dotted.bucket")  # path-style: dots are fine
    for bucket in buckets:
        assert presigner.handles(bucket)
        for key in KEYS:
            for expires in EXPIRIES:
                expected = botocore_url(client, method, bucket, key, expires)
                assert own_url(presigner, method, bucket, key, expires) == expected, (bucket, key, expires)


def test_the_shapes_verified_against_botocore(frozen_botocore: None) -> None:
    # What botocore 1.44 gives without an endpoint: the legacy global host in every region of the
    # aws partition, with the client's region in the credential scope.
    for region in ("us-east-1", "eu-west-1"):
        url = own_presigner(None, region, None).presign_get("bkt", "a b", 60)
        assert url.startswith("https://bkt.s3.amazonaws.com/a%20b?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
        assert f"%2F{region}%2Fs3%2Faws4_request" in url
        assert url == botocore_url(botocore_client(None, region, None), "GET", "bkt", "a b", 60)
    url = own_presigner("http://127.0.0.1:5000", "us-east-1", None).presign_put(
        "bkt", "k", 60, content_type=JSON_CONTENT_TYPE
    )
    assert url.startswith("http://127.0.0.1:5000/bkt/k?")
    assert "&X-Amz-SignedHeaders=content-type%3Bhost&" in url


@pytest.mark.usefixtures("frozen_botocore")
@pytest.mark.parametrize(
    "content_type",
    [
        JSON_CONTENT_TYPE,
        "text/plain; charset=utf-8",
        "  spaced   out\tvalue  ",
        "",
        "é",
        None,
        # botocore drops exactly this value before signing (it is its own default for forms).
        "application/x-www-form-urlencoded; charset=utf-8",
    ],
)
@pytest.mark.parametrize(("endpoint_url", "region"), ENDPOINTS[:3])
def test_put_content_types_identical(endpoint_url: str | None, region: str, content_type: str | None) -> None:
    client = botocore_client(endpoint_url, region, SESSION_TOKEN)
    presigner = own_presigner(endpoint_url, region, SESSION_TOKEN)
    for key in KEYS[:5]:
        assert (own_url(presigner, "PUT", "bkt-1", key, 900, content_type)
                == botocore_url(client, "PUT", "bkt-1", key, 900, content_type))


@pytest.mark.usefixtures("frozen_botocore")
@pytest.mark.parametrize(
    "clock",
    [
        lambda: FROZEN,  # naive: taken as UTC, as botocore's own
        lambda: FROZEN.replace(tzinfo=UTC),
        lambda: FROZEN.replace(tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Pacific/Auckland")),
    ],
    ids=["naive-utc", "aware-utc", "aware-other-zone"],
)
def test_clock_forms(clock: Callable[[], datetime]) -> None:
    client = botocore_client(None, "eu-west-1", None)
    presigner = own_presigner(None, "eu-west-1", None, clock=clock)
    assert presigner.presign_get("bkt", "k", 5) == botocore_url(client, "GET", "bkt", "k", 5)


_BUCKETS = st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,20}[a-z0-9]\Z").filter(lambda b: "--" not in b)
_KEYS = st.text(
    # Surrogates are not encodable as UTF-8 (botocore raises too); everything else is fair game.
    alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=300,
) | st.text(alphabet="/ +~%=&?#.aé", min_size=1, max_size=40)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    token=st.sampled_from([None, SESSION_TOKEN, "t/+=é"]),
    method=st.sampled_from(["GET", "PUT"]),
    bucket=_BUCKETS,
    key=_KEYS,
    expires=st.integers(min_value=1, max_value=604800),
    seconds=st.integers(min_value=0, max_value=10 * 365 * 86400),
)
def test_identical_to_botocore_for_any_key(
    monkeypatch: pytest.MonkeyPatch, endpoint: tuple[str | None, str], token: str | None, method: str,
    bucket: str, key: str, expires: int, seconds: int,
) -> None:
    instant = datetime(2020, 1, 1) + timedelta(seconds=seconds)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: instant)
    endpoint_url, region = endpoint
    presigner = own_presigner(endpoint_url, region, token, clock=lambda: instant)
    assert presigner.handles(bucket)
    assert (own_url(presigner, method, bucket, key, expires)
            == botocore_url(botocore_client(endpoint_url, region, token), method, bucket, key, expires))


def test_signing_key_is_cached_per_secret_day_region_service() -> None:
    signing_key.cache_clear()
    signing_hmac.cache_clear()
    presigner = own_presigner(None, "eu-west-1", None)
    for key in ("a", "b", "c"):
        presigner.presign_get("bkt", key, 60)
    # the key derived once, its keyed HMAC built once and copied for each signature
    assert signing_key.cache_info().misses == 1 and signing_hmac.cache_info().misses == 1
    assert signing_hmac.cache_info().hits == 2
    own_presigner(None, "us-east-1", None).presign_get("bkt", "a", 60)
    own_presigner(None, "us-east-1", None, clock=lambda: datetime(2026, 3, 15, tzinfo=UTC)).presign_get(
        "bkt", "a", 60
    )
    assert signing_key.cache_info().misses == 3 and signing_hmac.cache_info().misses == 3
    # The derivation is SigV4's (the AWS documentation's example key).
    assert signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam").hex() == (
        "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    )


def test_credentials_are_frozen_per_signature(frozen_botocore: None) -> None:
    # Refreshable credentials: each signature asks for a snapshot, so a refresh takes effect.
    class Rotating:
        def __init__(self) -> None:
            self.calls = 0

        def get_frozen_credentials(self) -> Any:
            self.calls += 1
            return Credentials(f"AKID{self.calls}", f"secret{self.calls}", None).get_frozen_credentials()

    source = Rotating()
    presigner = QueryPresigner(region="eu-west-1", endpoint_url=None, addressing_style="auto",
                               credentials=source, clock=lambda: FROZEN)
    first, second = presigner.presign_get("bkt", "k", 60), presigner.presign_get("bkt", "k", 60)
    assert "AKID1%2F" in first and "AKID2%2F" in second and source.calls == 2


def test_rejects_what_botocore_would_not_sign() -> None:
    presigner = own_presigner("http://127.0.0.1:5000", "us-east-1", None)
    with pytest.raises(ValueError):
        presigner.presign_get("bkt", "", 60)
    with pytest.raises(ValueError):
        presigner.presign_get("bkt", "k", True)  # a bool is an int to mypy, not to the presigner
    with pytest.raises(ValueError):
        presigner.presign_get("bkt", "k", 60.0)  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        presigner.presign_get("bkt", "\ud800", 60)


# --- what is left to botocore --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint_url", "region", "bucket"),
    [
        (None, "us-east-1", "my.bucket"),  # dots: botocore goes path-style on s3.amazonaws.com
        (None, "eu-west-1", "My_Bucket"),  # not a DNS label: path-style on the regional host
        (None, "eu-west-1", "UPPER"),
        (None, "eu-west-1", "ab"),  # too short for a bucket name
        (None, "eu-west-1", "x" * 64),
        (None, "eu-west-1", "-dash"),
        (None, "us-east-1", "arn:aws:s3:us-east-1:123456789012:accesspoint/ap"),
        (None, "us-east-1", "fast--use1-az4--x-s3"),  # S3 Express: its own credentials
        (None, "eu-west-1", "xn--bucket"),
        (None, "cn-north-1", "my-bucket"),  # another partition: amazonaws.com.cn
        (None, "us-gov-west-1", "my-bucket"),
        (None, "us-iso-east-1", "my-bucket"),
        (None, "aws-global", "my-bucket"),
        ("http://127.0.0.1:5000", "us-east-1", "Under_Score"),
        ("https://host.example/with/path", "us-east-1", "my-bucket"),
        ("https://user:pw@host.example", "us-east-1", "my-bucket"),
        ("http://[::1]:5000", "us-east-1", "my-bucket"),
        ("http://host.example:notaport", "us-east-1", "my-bucket"),
        ("ftp://host.example", "us-east-1", "my-bucket"),
        ("https://host.example?x=1", "us-east-1", "my-bucket"),
    ],
)
def test_handles_refuses_what_it_does_not_reproduce(endpoint_url: str | None, region: str, bucket: str) -> None:
    presigner = own_presigner(endpoint_url, region, None)
    assert not presigner.handles(bucket)
    with pytest.raises(ValueError, match="presign it with botocore"):
        presigner.presign_get(bucket, "k", 60)


def test_addressing_other_than_the_clients_is_left_to_botocore() -> None:
    credentials = Credentials(ACCESS_KEY, SECRET_KEY)
    assert not QueryPresigner(region="us-east-1", endpoint_url=None, addressing_style="path",
                              credentials=credentials).handles("my-bucket")
    assert not QueryPresigner(region="us-east-1", endpoint_url="http://127.0.0.1:5000",
                              addressing_style="auto", credentials=credentials).handles("my-bucket")


@pytest.fixture
def fresh_presigners() -> Iterator[None]:
    """Empty the process-wide caches of clients and presigners before and after (env changes)."""
    def clear() -> None:
        s3._fast_presigner.cache_clear()
        s3._query_presigner.cache_clear()
        s3._cached_s3.cache_clear()
    clear()
    yield
    clear()


@pytest.mark.usefixtures("frozen_botocore", "fresh_presigners")
@pytest.mark.parametrize("bucket", ["My_Bucket", "my.dotted.bucket"])
def test_fallback_for_a_bucket_not_dns_compatible_equals_botocore(
    monkeypatch: pytest.MonkeyPatch, bucket: str
) -> None:
    monkeypatch.setattr(presign, "utc_now", lambda: FROZEN.replace(tzinfo=UTC))
    used: list[str] = []

    def spy(*args: Any) -> str:
        used.append("own")
        return ""

    monkeypatch.setattr(QueryPresigner, "_presign", spy)
    settings = Settings(s3_endpoint_url=None, aws_region="eu-west-1", bucket=bucket)
    assert s3._fast_presigner(None, "eu-west-1", bucket) is None
    client = orchestrator_s3(settings)
    keys = ["runs/a b/output.json", "é+~"]
    assert presign_get_urls(settings, keys, 600) == {
        key: botocore_url(client, "GET", bucket, key, 600) for key in keys
    }
    grant = issue_storage_grant(settings, output_key="out/é.json", read_keys=keys, task_id="t")
    assert grant.presigned_put == botocore_url(client, "PUT", bucket, "out/é.json", 3600)
    assert grant.presigned_get == {key: botocore_url(client, "GET", bucket, key, 3600) for key in keys}
    assert used == []
    # botocore's own shape for these: path-style, the bucket in the path.
    assert grant.presigned_put is not None and f".amazonaws.com/{bucket}/out/" in grant.presigned_put


@pytest.mark.usefixtures("frozen_botocore", "fresh_presigners")
@pytest.mark.parametrize(("endpoint_url", "region"), [(None, "us-east-1"), (None, "eu-west-1"),
                                                      ("http://127.0.0.1:5000", "us-east-1")])
def test_storage_functions_use_the_own_presigner_and_equal_botocore(
    monkeypatch: pytest.MonkeyPatch, endpoint_url: str | None, region: str
) -> None:
    # The wiring in storage.s3, with the orchestrator's ambient credentials (the tests' fake
    # ones): issue_storage_grant and presign_get_urls give what botocore gave before.
    monkeypatch.setattr(presign, "utc_now", lambda: FROZEN.replace(tzinfo=UTC))
    calls: list[str] = []
    original = QueryPresigner._presign

    def spy(self: QueryPresigner, method: str, *args: Any) -> str:
        calls.append(method)
        return original(self, method, *args)

    monkeypatch.setattr(QueryPresigner, "_presign", spy)
    settings = Settings(s3_endpoint_url=endpoint_url, aws_region=region, bucket="tickweave-outputs",
                        storage_credentials_ttl_s=1200)
    client = orchestrator_s3(settings)
    keys = [*KEYS[:8], "runs/ws/p/r/v/nodes/up/attempts/1/output.json"]
    grant = issue_storage_grant(settings, output_key="runs/ws/p/r/v/nodes/me/attempts/1/output.json",
                                read_keys=keys, task_id="t")
    assert grant.presigned_put == botocore_url(
        client, "PUT", "tickweave-outputs", "runs/ws/p/r/v/nodes/me/attempts/1/output.json", 1200
    )
    assert grant.presigned_get == {key: botocore_url(client, "GET", "tickweave-outputs", key, 1200) for key in keys}
    assert presign_get_urls(settings, keys, 42, bucket="other-bucket") == {
        key: botocore_url(client, "GET", "other-bucket", key, 42) for key in keys
    }
    # Two buckets checked once each (a GET and a PUT), then one signature per URL.
    assert calls.count("PUT") == 2 + 1
    assert calls.count("GET") == 2 + 2 * len(keys)


@pytest.mark.usefixtures("fresh_presigners")
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AWS_S3_US_EAST_1_REGIONAL_ENDPOINT", "regional"),
        ("AWS_ENDPOINT_URL_S3", "https://elsewhere.example"),
        ("AWS_USE_FIPS_ENDPOINT", "true"),
        ("AWS_USE_DUALSTACK_ENDPOINT", "true"),
    ],
)
def test_configuration_that_changes_botocores_urls_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str, value: str
) -> None:
    # The static rule cannot see what botocore merges into the client from the environment; the
    # one-time check against botocore does, and the URLs stay botocore's.
    monkeypatch.setenv(variable, value)
    settings = Settings(s3_endpoint_url=None, aws_region="us-east-1", bucket="tickweave-outputs")
    assert s3._query_presigner(None, "us-east-1") is not None
    assert s3._fast_presigner(None, "us-east-1", "tickweave-outputs") is None
    assert "differs from botocore's" in caplog.text
    url = presign_get_urls(settings, ["k"], 60)["k"]
    assert not url.startswith("https://tickweave-outputs.s3.amazonaws.com/")


# --- against the moto server ---------------------------------------------------------------------
# moto (server mode) does not check SigV4 signatures: these prove the URLs' shape and encoding
# (the object lands under exactly its key, with its content type); the signatures are proven by
# the identity with botocore above and by the AWS documentation's example.


@pytest.fixture
def moto_settings(moto_server: MotoServer) -> Settings:
    settings = Settings(s3_endpoint_url=moto_server.endpoint_url, bucket=f"presign-{uuid.uuid4().hex[:12]}")
    ensure_bucket(settings)
    return settings


@pytest.mark.parametrize("key", ["runs/ws/p/r/v/nodes/n/attempts/1/output.json", "odd/ é+~%2F=&?#;/x",
                                 "//lead//double/", "日本/😀.json"])
def test_urls_work_against_moto(moto_settings: Settings, key: str) -> None:
    region = moto_settings.aws_region
    credentials = s3._shared_session(region).get_credentials()
    assert credentials is not None
    presigner = QueryPresigner(region=region, endpoint_url=moto_settings.s3_endpoint_url,
                               addressing_style="path", credentials=credentials)
    body = b'{"stored":"\xc3\xa9"}'
    put_url = presigner.presign_put(moto_settings.bucket, key, 300, content_type=JSON_CONTENT_TYPE)
    response = httpx.put(put_url, content=body, headers={"Content-Type": JSON_CONTENT_TYPE})
    assert response.status_code == 200, response.text
    # Stored under exactly that key (the path encoding is what S3 decodes back to the key).
    assert read_json_object(moto_settings, key) == {"stored": "é"}
    stored = orchestrator_s3(moto_settings).head_object(Bucket=moto_settings.bucket, Key=key)
    assert stored["ContentType"] == JSON_CONTENT_TYPE

    response = httpx.get(presigner.presign_get(moto_settings.bucket, key, 300))
    assert response.status_code == 200, response.text
    assert response.content == body


def test_grant_urls_from_the_storage_module_work_against_moto(moto_settings: Settings) -> None:
    # Through issue_storage_grant (the dispatch path): the own presigner is the one in use.
    assert s3._fast_presigner(moto_settings.s3_endpoint_url, moto_settings.aws_region,
                              moto_settings.bucket) is not None
    output_key = "runs/ws/p/r/v/nodes/me/attempts/1/output.json"
    grant = issue_storage_grant(moto_settings, output_key=output_key, read_keys=[output_key], task_id="t")
    assert grant.presigned_put is not None
    response = httpx.put(grant.presigned_put, content=b'{"me":1}', headers={"Content-Type": JSON_CONTENT_TYPE})
    assert response.status_code == 200, response.text
    response = httpx.get(grant.presigned_get[output_key])
    assert response.status_code == 200 and response.json() == {"me": 1}


def test_the_aws_documentation_example() -> None:
    # Independent of botocore: the presigned GET of AWS's "Authenticating Requests: Using Query
    # Parameters (AWS Signature Version 4)" example.
    presigner = QueryPresigner(
        region="us-east-1", endpoint_url=None, addressing_style="auto",
        credentials=Credentials(ACCESS_KEY, SECRET_KEY), clock=lambda: datetime(2013, 5, 24, tzinfo=UTC),
    )
    assert presigner.presign_get("examplebucket", "test.txt", 86400) == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )
