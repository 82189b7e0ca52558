"""Data set loaders: IDX and CIFAR parsing on tiny files, digits, synthetic."""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest

from hpcfl.config.schema import SCHEMA
from hpcfl.data import Dataset, load_dataset
from hpcfl.data.cifar import load_batch
from hpcfl.data.idx import IDX_FILES, read_idx
from hpcfl.data.synthetic import generate_device
from hpcfl.errors import ConfigError, DataError

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def data_cfg(**kw):
    cfg = {k: f.default for k, f in SCHEMA["data"].items()}
    cfg.update(kw)
    return cfg


def idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=False):
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_mnist(d, n_train=12, n_test=5, hw=(28, 28), gz=False, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = [rng.integers(0, 256, (n_train, *hw), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, *hw), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)]
    for name, arr in zip(IDX_FILES, arrays):
        write_idx(d / name, arr, gz)
    return arrays


# ---------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    back = read_idx(write_idx(tmp_path / "a-idx3", arr, gz))
    assert back.dtype == arr.dtype and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist(tmp_path, gz):
    xtr, ytr, xte, yte = make_mnist(tmp_path, gz=gz)
    ds = load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)
    assert ds.name == "mnist" and ds.input_shape == (1, 28, 28) and ds.n_classes == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.y_test, yte)
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4
    # standardization is one affine map fitted on train: pixel order and test scaling preserved
    raw = xtr.astype(np.float64) / 255
    np.testing.assert_allclose(ds.x_train[:, 0] * raw.std() + raw.mean(), raw, atol=1e-5)
    np.testing.assert_allclose(ds.x_test[:, 0] * raw.std() + raw.mean(), xte / 255, atol=1e-5)
    assert ds.natural_clients is None


def test_load_fashion_mnist_torchvision_layout(tmp_path):
    make_mnist(tmp_path / "FashionMNIST" / "raw", hw=(6, 5), gz=True)
    ds = load_dataset(data_cfg(dataset="fashion_mnist", path=str(tmp_path)), seed=0)
    assert ds.name == "fashion_mnist" and ds.input_shape == (1, 6, 5)
    # the MNIST sub-layout belongs to mnist only
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)


def test_mnist_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*t10k-labels-idx1-ubyte.*nope.*no such directory"):
        load_dataset(data_cfg(dataset="mnist", path=str(missing)), seed=0)
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=f"missing t10k-labels-idx1-ubyte.*{tmp_path.name}"):
        load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="data.path is empty"):
        load_dataset(data_cfg(dataset="mnist", path=""), seed=0)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "bad-idx1"
    p.write_bytes(b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DataError, match=r"bad-idx1.*not an IDX file.*00010801"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01")  # unknown type code
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(p)
    p.write_bytes(b"")
    with pytest.raises(DataError, match="magic bytes missing"):
        read_idx(p)


def test_idx_wrong_length(tmp_path):
    raw = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    p = tmp_path / "short-idx3"
    p.write_bytes(raw[:-1])
    with pytest.raises(DataError, match=r"short-idx3: truncated: 51 bytes, but dims \(4, 3, 3\) need 52"):
        read_idx(p)
    p.write_bytes(raw[:10])  # header cut inside the dims
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(p)
    p.write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)
    p.write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(DataError, match="short-idx3: cannot read"):
        read_idx(p)


def test_mnist_label_count_and_kind(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / IDX_FILES[1], np.zeros(11, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 11 labels but train-images-idx3-ubyte holds 12"):
        load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)
    write_idx(tmp_path / IDX_FILES[1], np.full(12, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 outside"):
        load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)
    write_idx(tmp_path / IDX_FILES[0], np.zeros((12, 28, 28), np.float32))
    with pytest.raises(DataError, match="train-images-idx3-ubyte: want uint8 images"):
        load_dataset(data_cfg(dataset="mnist", path=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- CIFAR
def write_cifar(d, n=4, protocol=2, seed=0):
    """Batches like the real files: dict with bytes keys, uint8 (N, 3072) data, list labels."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"img%d.png" % i for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = batch
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_cifar10(tmp_path, protocol):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset(data_cfg(dataset="cifar10", path=str(tmp_path)), seed=0)
    assert ds.input_shape == (3, 32, 32) and ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), []))
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    # per-channel standardization, and the R/G/B planes land in channels 0/1/2
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).astype(np.float64) / 255
    red = raw[:, :1024]
    np.testing.assert_allclose(ds.x_train[:, 0].reshape(20, -1) * red.std() + red.mean(), red, atol=1e-5)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar_refuses_disallowed_global(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1.*refusing global (os|posix|nt)\.system"):
        load_batch(p)
    assert not marker.exists()
    p.write_bytes(pickle.dumps({b"data": eval}, protocol=2))
    with pytest.raises(DataError, match=r"refusing global (__builtin__|builtins)\.eval"):
        load_batch(p)


def test_cifar_malformed_batches(tmp_path):
    write_cifar(tmp_path)
    p = tmp_path / "data_batch_3"
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3: 1 labels for 2 images"):
        load_dataset(data_cfg(dataset="cifar10", path=str(tmp_path)), seed=0)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: b'data' must be a uint8 \(N, 3072\)"):
        load_batch(p)
    p.write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 batch"):
        load_batch(p)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match=r"missing test_batch; expected data_batch_1.*test_batch in"):
        load_dataset(data_cfg(dataset="cifar10", path=str(tmp_path)), seed=0)


class _Py2Pickler:
    """The byte stream Python 2's cPickle.dump(batch, f, protocol=2) writes for a CIFAR-10 batch, built by hand.

    What makes the real files different from anything Python 3 writes: every str is a Python 2 byte
    string (SHORT_BINSTRING ``U`` up to 255 bytes, BINSTRING ``T`` beyond, so the 30 MB image block
    is one ``T``), the array comes from ``numpy.core.multiarray._reconstruct`` with a ``numpy.dtype``
    whose state holds the str ``'|'``, and the memo starts at 1. Python 3 decodes those strings as
    ASCII by default and fails on the image bytes: the loader needs ``encoding='bytes'``.
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo = 0

    def op(self, b: bytes) -> "_Py2Pickler":
        self.out += b
        return self

    def put(self) -> "_Py2Pickler":  # BINPUT / LONG_BINPUT, as cPickle memoizes shared objects
        self.memo += 1
        return self.op(b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo))

    def int(self, v: int) -> "_Py2Pickler":
        if 0 <= v < 256:
            return self.op(b"K" + bytes([v]))                    # BININT1
        if 0 <= v < 65536:
            return self.op(b"M" + struct.pack("<H", v))          # BININT2
        return self.op(b"J" + struct.pack("<i", v))              # BININT

    def str(self, v: bytes, memo: bool = True) -> "_Py2Pickler":
        self.op(b"U" + bytes([len(v)]) + v if len(v) < 256 else b"T" + struct.pack("<I", len(v)) + v)
        return self.put() if memo else self

    def glob(self, module: str, name: str) -> "_Py2Pickler":
        return self.op(f"c{module}\n{name}\n".encode()).put()  # GLOBAL

    def ndarray(self, a: np.ndarray) -> "_Py2Pickler":
        assert a.dtype == np.uint8 and a.ndim == 2
        self.glob("numpy.core.multiarray", "_reconstruct").glob("numpy", "ndarray")
        self.int(0).op(b"\x85").str(b"b", memo=False).op(b"\x87R").put()   # _reconstruct(ndarray, (0,), 'b')
        self.op(b"(").int(1).int(a.shape[0]).int(a.shape[1]).op(b"\x86")      # state: (1, shape,
        self.glob("numpy", "dtype").str(b"u1", memo=False).int(0).int(1).op(b"\x87R").put()  # dtype('u1', 0, 1)
        self.op(b"(").int(3).str(b"|", memo=False).op(b"NNN").int(-1).int(-1).int(0).op(b"tb")  # its state
        return self.op(b"\x89").str(a.tobytes()).op(b"tb")                 # False, data) BUILD

    def batch(self, batch: dict) -> bytes:
        self.op(b"}").put().op(b"(")                                        # EMPTY_DICT, MARK
        for key, v in batch.items():
            self.str(key)
            if isinstance(v, np.ndarray):
                self.ndarray(v)
            elif isinstance(v, bytes):
                self.str(v)
            else:
                self.op(b"]").put().op(b"(")                                # EMPTY_LIST, MARK
                for x in v:
                    self.int(x) if isinstance(x, int) else self.str(x)
                self.op(b"e")                                               # APPENDS
        return bytes(self.op(b"u.").out)                                    # SETITEMS, STOP


def write_cifar_py2(d, n=4, seed=0):
    """The six batches as the CIFAR-10 python tarball has them (Python 2 pickles, key order as stored)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        label = b"testing batch 1 of 1" if name == "test_batch" else b"training batch %d of 5" % (i + 1)
        batch = {b"batch_label": label, b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"leptodactylus_pentadactylus_s_%06d.png" % (n * i + j) for j in range(n)]}
        (d / name).write_bytes(_Py2Pickler().batch(batch))
        out[name] = batch
    return out


def test_cifar_python2_batches(tmp_path):
    """The real CIFAR-10 files are Python 2 cPickle streams (see _Py2Pickler); the loader reads them."""
    batches = write_cifar_py2(tmp_path / "cifar-10-batches-py")
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    # the fixture is what we claim: protocol 2, Python 2 string opcodes, numpy.core's _reconstruct
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert ops[0] == ("PROTO", 2) and ops[-1][0] == "STOP"
    names = {name for name, _ in ops}
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL", "REDUCE", "BUILD", "NEWFALSE", "SETITEMS", "APPENDS"} <= names
    assert not names & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "FRAME", "STACK_GLOBAL"}  # nothing Python 3
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("SHORT_BINSTRING", "labels") in ops
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # Python 3's default (ASCII) cannot read it: hence encoding='bytes'
    for name, batch in batches.items():
        data, labels = load_batch(tmp_path / "cifar-10-batches-py" / name)
        assert data.dtype == np.uint8 and data.shape == (4, 3072) and data.flags.c_contiguous
        np.testing.assert_array_equal(data, batch[b"data"])
        assert labels.dtype == np.int64 and labels.tolist() == batch[b"labels"]
    ds = load_dataset(data_cfg(dataset="cifar10", path=str(tmp_path)), seed=0)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    # the same batches pickled by Python 3 load to the same data set
    write_cifar(tmp_path / "py3", seed=0)
    ref = load_dataset(data_cfg(dataset="cifar10", path=str(tmp_path / "py3")), seed=0)
    np.testing.assert_array_equal(ds.x_train, ref.x_train)
    np.testing.assert_array_equal(ds.y_train, ref.y_train)


# ---------------------------------------------------------------- digits
def test_digits_shapes_split_and_determinism():
    a = load_dataset(data_cfg(dataset="digits", test_fraction=0.25), seed=1)
    assert a.input_shape == (1, 8, 8) and a.n_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.n_train + a.n_test == 1797 and abs(a.n_test - 0.25 * 1797) <= 10
    assert abs(a.x_train.mean()) < 1e-5 and abs(a.x_train.std() - 1) < 1e-4
    counts = np.bincount(a.y_test, minlength=10) / np.bincount(np.r_[a.y_train, a.y_test], minlength=10)
    np.testing.assert_allclose(counts, 0.25, atol=0.01)  # stratified
    b = load_dataset(data_cfg(dataset="digits", test_fraction=0.25), seed=1)
    c = load_dataset(data_cfg(dataset="digits", test_fraction=0.25), seed=2)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.n_train == c.n_train and not np.array_equal(a.y_train, c.y_train)
    # no sample in both splits: rows of train and test are distinct images
    rows = {r.tobytes() for r in a.x_train.reshape(a.n_train, -1)}
    assert sum(r.tobytes() in rows for r in a.x_test.reshape(a.n_test, -1)) <= 2  # digits has a few duplicates


# ---------------------------------------------------------------- synthetic
def test_synthetic_shapes_natural_clients_and_determinism():
    cfg = data_cfg(dataset="synthetic", n_clients=7, synthetic_dim=12, synthetic_classes=5, test_fraction=0.3)
    a = load_dataset(cfg, seed=3)
    assert a.input_shape == (12,) and a.n_classes == 5 and a.x_train.shape[1] == 12
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(a.x_train.std(axis=0), 1, atol=1e-3)
    nat = a.natural_clients
    assert len(nat) == 7 and all(n.dtype == np.int64 and n.size >= 35 for n in nat)
    np.testing.assert_array_equal(np.concatenate(nat), np.arange(a.n_train))
    per_device = np.array([n.size for n in nat]) / (1 - 0.3)
    assert a.n_test == pytest.approx(0.3 * per_device.sum(), abs=7)
    b = load_dataset(cfg, seed=3)
    c = load_dataset(cfg, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.n_train != c.n_train or not np.array_equal(a.x_train, c.x_train)


def test_synthetic_device_independent_of_device_count():
    kw = dict(alpha=1.0, beta=1.0, dim=8, n_classes=4, sigma=1.0)
    x0, y0 = generate_device(5, 2, **kw)
    x1, y1 = generate_device(5, 2, **kw)
    x2, _ = generate_device(5, 3, **kw)
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(y0, y1)
    assert x0.shape != x2.shape or not np.allclose(x0, x2)


def _mean_label_entropy(ds: Dataset) -> float:
    ent = []
    for idx in ds.natural_clients:
        p = np.bincount(ds.y_train[idx], minlength=ds.n_classes) / idx.size
        p = p[p > 0]
        ent.append(-(p * np.log(p)).sum())
    return float(np.mean(ent))


def test_synthetic_heterogeneity_grows_with_alpha_beta():
    def ent(a, b):
        return np.mean([_mean_label_entropy(load_dataset(data_cfg(
            dataset="synthetic", n_clients=30, synthetic_alpha=a, synthetic_beta=b), seed=s)) for s in range(3)])

    assert ent(5.0, 5.0) < ent(0.0, 0.0) - 0.1


def test_synthetic_alpha_only_shifts_all_logits():
    # u_k enters W_k and b_k as one offset for every class, so labels ignore alpha (see module docstring)
    kw = dict(beta=1.0, dim=10, n_classes=6, sigma=0.5)
    _, y_lo = generate_device(0, 0, alpha=0.0, **kw)
    _, y_hi = generate_device(0, 0, alpha=3.0, **kw)
    np.testing.assert_array_equal(y_lo, y_hi)


def test_synthetic_sigma_limit():
    with pytest.raises(ConfigError, match="data.synthetic_sigma"):
        load_dataset(data_cfg(dataset="synthetic", n_clients=50, synthetic_sigma=30.0), seed=0)


def test_unknown_dataset_and_dataset_checks():
    with pytest.raises(ConfigError, match="data.dataset: unknown data set 'imagenet'"):
        load_dataset(data_cfg(dataset="imagenet"), seed=0)
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="labels outside"):
        Dataset("t", x, np.array([0, 1, 5]), x, np.zeros(3, np.int64), (2,), 3)
    with pytest.raises(TypeError, match="float32/int64"):
        Dataset("t", x.astype(np.float64), np.zeros(3, np.int64), x, np.zeros(3, np.int64), (2,), 3)
