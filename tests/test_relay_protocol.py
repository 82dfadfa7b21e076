"""The relay's pure protocol: end-to-end envelopes a relay cannot forge, invites, tunnel proofs, admissions."""

from __future__ import annotations

import dataclasses
import faulthandler
import os

import msgpack
import pytest

from node import cli
from node.mesh.admission import Admissions
from peers.identity import NodeIdentity
from peers.invite import InviteError, check_join, make_invite, make_join, read_invite, secret_digest
from peers.relay import (
    Envelope,
    EnvelopeOpener,
    EnvelopeSealer,
    RelayForgery,
    TunnelChallenge,
    check_tunnel,
    parse_relayed_url,
    prove_tunnel,
    relayed_url,
    request_digest,
)
from peers.wire import GenerateFrame, WireError, decode, encode

HOME = NodeIdentity.generate()
RELAY = NodeIdentity.generate()
NONCE = os.urandom(16)
DIGEST = request_digest("generate", b"the request body")


def _reply(identity: NodeIdentity = HOME, nonce: bytes = NONCE, digest: bytes = DIGEST) -> list[bytes]:
    """A streamed generation as the home node seals it: status, two token frames, done, signed end."""
    sealer = EnvelopeSealer(identity, nonce, digest)
    out = sealer.seal(b"", status=200)
    for text in ("Hello", " world"):
        out += sealer.seal(encode(GenerateFrame(kind="delta", text=text)))
    out += sealer.seal(encode(GenerateFrame(kind="done", finish_reason="stop", completion_tokens=2)))
    out += sealer.seal(b"", end=True)
    return out


def _open(envelopes: list[bytes], node_id: str = HOME.node_id, nonce: bytes = NONCE, digest: bytes = DIGEST) -> bytes:
    opener = EnvelopeOpener(node_id, nonce, digest)
    data = b""
    for env in envelopes:
        for opened in opener.feed(env):
            data += opened.data
    assert opener.ended, "the signed end never came"
    return data


def _texts(data: bytes) -> list[str]:
    frames = []
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    for obj in unpacker:
        frames.append(decode(msgpack.packb(obj), GenerateFrame, max_bytes=1 << 16).text)
    return frames


def test_an_honest_relay_delivers_the_reply_byte_for_byte() -> None:
    assert _texts(_open(_reply())) == ["Hello", " world", ""]


def test_chunking_by_the_relay_does_not_matter() -> None:
    stream = b"".join(_reply())
    opener = EnvelopeOpener(HOME.node_id, NONCE, DIGEST)
    data = b"".join(o.data for i in range(0, len(stream), 7) for o in opener.feed(stream[i : i + 7]))
    assert opener.ended and _texts(data) == ["Hello", " world", ""]


def _tamper(env_bytes: bytes, **changes) -> bytes:
    env = decode(env_bytes, Envelope, max_bytes=1 << 20)
    return encode(dataclasses.replace(env, **changes))


def test_a_relay_cannot_alter_a_token() -> None:
    envelopes = _reply()
    altered = encode(GenerateFrame(kind="delta", text="Buy crypto"))
    envelopes[1] = _tamper(envelopes[1], data=altered)
    with pytest.raises(RelayForgery, match="does not verify"):
        _open(envelopes)


def test_a_relay_cannot_inject_a_token_signed_by_itself() -> None:
    envelopes = _reply()
    # The relay seals its own frame with its own key, in the slot of the next envelope.
    forged = EnvelopeSealer(RELAY, NONCE, DIGEST)
    forged._seq = 2
    envelopes.insert(2, forged.seal(encode(GenerateFrame(kind="delta", text=" injected")))[0])
    with pytest.raises(RelayForgery):
        _open(envelopes)


def test_a_relay_cannot_drop_reorder_or_cut_envelopes() -> None:
    envelopes = _reply()
    with pytest.raises(RelayForgery, match="was due"):
        _open(envelopes[:1] + envelopes[2:])
    with pytest.raises(RelayForgery, match="was due"):
        _open([envelopes[0], envelopes[2], envelopes[1], *envelopes[3:]])
    with pytest.raises(AssertionError, match="signed end"):
        _open(envelopes[:-1])


def test_a_relay_cannot_impersonate_the_home_node() -> None:
    # A whole reply made by the relay under its own key, for the home node's id: the key does not match the id.
    with pytest.raises(RelayForgery, match="not signed by node"):
        _open(_reply(identity=RELAY))
    # Nor can it claim the home node's key and sign with its own.
    envelopes = _reply(identity=RELAY)
    envelopes[0] = _tamper(envelopes[0], public_key=HOME.public_key_raw)
    with pytest.raises(RelayForgery, match="does not verify"):
        _open(envelopes)


def test_a_relay_cannot_replay_an_old_reply_or_alter_the_request() -> None:
    old = _reply(nonce=os.urandom(16))
    with pytest.raises(RelayForgery):
        _open(old)
    # The home node signs the digest of the request it received: a changed prompt shows.
    with pytest.raises(RelayForgery):
        _open(_reply(digest=request_digest("generate", b"another prompt")))


def test_relayed_addresses() -> None:
    url = relayed_url("http://203.0.113.5:8470/", HOME.node_id)
    assert url == f"http://203.0.113.5:8470/peer/v1/relay/{HOME.node_id}"
    parsed = parse_relayed_url(url)
    assert parsed is not None and parsed.relay_url == "http://203.0.113.5:8470" and parsed.node_id == HOME.node_id
    assert parse_relayed_url("http://203.0.113.5:8470") is None
    assert parse_relayed_url("http://h/peer/v1/relay/NOT-AN-ID") is None


def test_a_tunnel_proof_binds_key_challenge_and_relay() -> None:
    challenge = TunnelChallenge(nonce=os.urandom(16), relay_node_id=RELAY.node_id)
    assert check_tunnel(challenge, prove_tunnel(HOME, challenge)) == HOME.node_id
    other = TunnelChallenge(nonce=os.urandom(16), relay_node_id=RELAY.node_id)
    with pytest.raises(WireError):
        check_tunnel(other, prove_tunnel(HOME, challenge))
    stolen = dataclasses.replace(prove_tunnel(RELAY, challenge), public_key=HOME.public_key_raw)
    with pytest.raises(WireError):
        check_tunnel(challenge, stolen)


def test_invites_are_signed_expiring_and_tamper_evident() -> None:
    secret = os.urandom(16)
    text = make_invite(RELAY, ["http://203.0.113.5:8470"], secret, 10_000, one_time=True, relay=True)
    assert "\n" not in text and " " not in text
    invite = read_invite(text, 5_000)
    assert invite.node_id == RELAY.node_id and invite.relay and invite.secret == secret
    with pytest.raises(InviteError, match="expired"):
        read_invite(text, 10_001)
    forged = make_invite(HOME, ["http://198.51.100.9:8470"], secret, 10_000, one_time=True, relay=True)
    spliced = dataclasses.replace(read_invite(forged, 0), node_id=RELAY.node_id, public_key=RELAY.public_key_raw)
    import base64

    from peers.invite import INVITE_PREFIX

    with pytest.raises(InviteError, match="signature"):
        read_invite(INVITE_PREFIX + base64.urlsafe_b64encode(encode(spliced)).decode().rstrip("="), 0)
    with pytest.raises(InviteError, match="starts with"):
        read_invite("hello", 0)
    with pytest.raises(InviteError, match="malformed"):
        read_invite(text[:-10], 0)


def test_a_join_proves_the_joiner_key_for_this_inviter() -> None:
    invite = read_invite(make_invite(RELAY, ["http://203.0.113.5:8470"], os.urandom(16), 10_000, one_time=True, relay=True), 0)
    request = make_join(HOME, invite)
    assert check_join(request, RELAY.node_id) == HOME.node_id
    with pytest.raises(WireError):
        check_join(request, HOME.node_id)  # presented to another node
    with pytest.raises(WireError):
        check_join(dataclasses.replace(request, public_key=NodeIdentity.generate().public_key_raw), RELAY.node_id)


def test_admissions_one_time_revocation_and_restart(tmp_path) -> None:
    admissions = Admissions(tmp_path)
    digest = secret_digest(b"s" * 16)
    admissions.issue(digest, 10_000, one_time=True, relay=True, now_ms=0)
    admissions.redeem(digest, "nodea", 1)
    admissions.redeem(digest, "nodea", 2)  # the same node again (a restart) is fine
    with pytest.raises(PermissionError, match="used already"):
        admissions.redeem(digest, "nodeb", 3)
    with pytest.raises(PermissionError, match="expired"):
        admissions.redeem(digest, "nodea", 10_001)
    assert admissions.is_admitted("nodea")
    admissions.revoke("nodea", 4)
    reopened = Admissions(tmp_path)  # survives a restart
    assert reopened.is_revoked("nodea") and not reopened.is_admitted("nodea")
    reusable = secret_digest(b"r" * 16)
    reopened.issue(reusable, 10_000, one_time=False, relay=True, now_ms=5)
    reopened.redeem(reusable, "nodeb", 6)
    reopened.redeem(reusable, "nodec", 7)
    with pytest.raises(PermissionError, match="revoked"):
        reopened.redeem(reusable, "nodea", 8)


def test_a_bad_invite_at_start_is_a_clear_error(
    tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `expertmesh start` in this process: the invite must be refused before any model loads (conftest's model
    # guard fails the test otherwise); pytest's captured stderr has no file descriptor for faulthandler.
    monkeypatch.setattr(faulthandler, "enable", lambda **_: None)
    assert cli.main(["start", "--data-dir", str(tmp_path), "--join", "expertmesh-invite:nonsense"]) == 2
    stderr = capsys.readouterr().err
    assert "--join: invite is malformed" in stderr, stderr
    expired = make_invite(RELAY, ["http://203.0.113.5:8470"], os.urandom(16), 1, one_time=True, relay=True)
    assert cli.main(["start", "--data-dir", str(tmp_path), "--join", expired]) == 2
    stderr = capsys.readouterr().err
    assert "expired" in stderr, stderr


def test_a_sealed_request_and_its_reply_are_readable_only_at_the_two_ends() -> None:
    from peers.relay import home_e2e_key, open_request, seal_request

    home_key = home_e2e_key(HOME).public_key().public_bytes_raw()
    assert home_e2e_key(HOME).public_key().public_bytes_raw() == home_key  # stable: derived from the node key
    sealed = seal_request(HOME.node_id, home_key, NONCE, "generate", {"X-Expertmesh-Node": "me"}, b"the secret prompt")
    assert b"secret" not in sealed.body and b"generate" not in sealed.body
    inner = open_request(HOME, NONCE, sealed.requester_key, sealed.body)
    assert (inner.route, inner.headers, inner.body) == ("generate", ("X-Expertmesh-Node", "me"), b"the secret prompt")
    # The relay holds no key that opens it, and a request altered on the way does not open either.
    with pytest.raises(WireError):
        open_request(RELAY, NONCE, sealed.requester_key, sealed.body)
    with pytest.raises(WireError):
        open_request(HOME, NONCE, sealed.requester_key, sealed.body[:-1] + bytes([sealed.body[-1] ^ 1]))
    digest = request_digest("sealed", sealed.body)
    envelopes = EnvelopeSealer(HOME, NONCE, digest, cipher=inner.reply_cipher).seal(
        encode(GenerateFrame(kind="delta", text="Paris")), status=200, end=True
    )
    assert b"Paris" not in b"".join(envelopes)
    opened = list(EnvelopeOpener(HOME.node_id, NONCE, digest, cipher=sealed.reply_cipher).feed(envelopes[0]))
    assert opened[0].status == 200 and _texts(opened[0].data) == ["Paris"]
    # Opened with another session's key (say, a replay into a new request), it fails.
    other = seal_request(HOME.node_id, home_key, NONCE, "generate", {}, b"x")
    with pytest.raises(RelayForgery, match="decrypt"):
        list(EnvelopeOpener(HOME.node_id, NONCE, digest, cipher=other.reply_cipher).feed(envelopes[0]))
