"""Adapter names and client paths: plain names only, and nothing leaves the adapter root."""

import os

import pytest

from graftlm.serve.registry import AdapterRequestError, check_adapter_name, resolve_adapter_path


def make_adapter(d):
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")
    return d


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "good")
    make_adapter(root / "team" / "nested")
    make_adapter(tmp_path / "outside")
    return root


@pytest.mark.parametrize("name", ["a", "math-v2", "A.b_c", "x" * 64, "0day"])
def test_plain_names_pass(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a\\b", "..", "a..b", "x" * 65,
                                  "a b", "a\x00b", "%2e%2e", "é", "a\n"])
def test_other_names_refused(name):
    with pytest.raises(AdapterRequestError) as e:
        check_adapter_name(name)
    assert e.value.status == 400 and e.value.param == "name"


def test_paths_inside_resolve(root):
    assert resolve_adapter_path(root, "good") == (root / "good").resolve()
    assert resolve_adapter_path(root, "team/nested") == (root / "team" / "nested").resolve()
    assert resolve_adapter_path(root, "./good/") == (root / "good").resolve()


@pytest.mark.parametrize("path", ["../outside", "good/../../outside", "/etc", "~/x", "%2e%2e/outside",
                                  "..%2foutside", "good\x00", "good\\..\\..", "a" * 2000, ("a" * 300) + "/x",
                                  "", ".", "good/\n"])
def test_bad_paths_refused(root, path):
    with pytest.raises(AdapterRequestError) as e:
        resolve_adapter_path(root, path)
    assert 400 <= e.value.status < 500


def test_symlinks_out_refused(root, tmp_path):
    os.symlink(tmp_path / "outside", root / "link_dir")
    with pytest.raises(AdapterRequestError) as e:
        resolve_adapter_path(root, "link_dir")
    assert e.value.status == 403
    # a real directory inside the root whose weight file links out
    d = root / "sneaky"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    os.symlink(tmp_path / "outside" / "adapter_model.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(AdapterRequestError) as e:
        resolve_adapter_path(root, "sneaky")
    assert e.value.status == 403


def test_symlink_within_root_allowed(root):
    os.symlink(root / "good", root / "alias")
    assert resolve_adapter_path(root, "alias") == (root / "good").resolve()


def test_missing_and_non_adapter_dirs(root):
    with pytest.raises(AdapterRequestError) as e:
        resolve_adapter_path(root, "nope")
    assert e.value.status == 404
    (root / "empty").mkdir()
    with pytest.raises(AdapterRequestError) as e:
        resolve_adapter_path(root, "empty")
    assert e.value.status == 400
