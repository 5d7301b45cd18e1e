"""Findings of the seventh review round, each pinned by a test."""
from __future__ import annotations

import pytest

from model.unit import UNITConfig
from pipeline.storage import canonical, redact, redact_text


@pytest.mark.parametrize("name", ["w_gan", "w_recon", "w_kl", "w_cyc", "w_cyc_b", "w_cyc_kl", "w_r1", "w_hue"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loss_weights_must_be_finite(name, value):
    # NaN passed the `v < 0` check and made the first step's loss NaN
    with pytest.raises(ValueError, match=f"{name}=.*finite"):
        UNITConfig(**{name: value})


@pytest.mark.parametrize("url, want", [
    ("https://user:pa#ss@host.example/x.tar", "https://host.example/x.tar"),
    ("https://user:p?ss@host.example/x.tar", "https://host.example/x.tar"),
    ("s3://AKIAXXXX:abc/defSECRET@bucket/key.tar", "s3://bucket/key.tar"),
])
def test_a_password_with_a_slash_or_query_character_is_redacted(url, want):
    assert redact(url) == want and canonical(url) == want
    text = redact_text(f"could not read {url}: 403")
    assert "SECRET" not in text and "pa#ss" not in text and "p?ss" not in text and want in text


@pytest.mark.parametrize("url", ["https://host:8080/path/a@b.jpg", "https://[::1]:8080/x@y.jpg",
                                 "s3://bucket/a@b:c/x.tar", "http://host/x@y:z.jpg"])
def test_an_at_sign_in_a_key_after_a_plain_host_is_kept(url):
    assert redact(url) == url
