"""CT readers for image files, HU clipping, and chunks that stay centred at the edges."""

import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_scan

from luna.ct import AIR_HU, Ct, clip_hu, crop
from luna.errors import LunaError
from luna.geometry import Geometry
from luna.io import load_ct, read_chunk
from luna.io.image import read_image

GEOMETRY = Geometry((-150.0, -170.0, -300.0), (0.7, 0.8, 2.5), np.diag([-1.0, -1.0, 1.0]).ravel())


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.integers(-3024, 3000, size=(20, 30, 40)).astype(np.int16)


@pytest.mark.parametrize("name", ["1.2.3.4.mhd", "1.2.3.4.mha", "1.2.3.4.nii", "1.2.3.4.nii.gz"])
def test_image_formats_keep_voxels_and_lps_geometry(tmp_path, volume, name):
    path = write_scan(tmp_path / name, volume, GEOMETRY)
    ct = load_ct(path, hu_range=None)
    assert ct.series_uid == "1.2.3.4"
    assert ct.hu.dtype == np.int16 and ct.shape_irc == volume.shape
    np.testing.assert_array_equal(ct.hu, volume)
    np.testing.assert_allclose(ct.geometry.origin_xyz, GEOMETRY.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(ct.geometry.spacing_xyz, GEOMETRY.spacing_xyz, atol=1e-5)
    np.testing.assert_allclose(ct.geometry.direction, GEOMETRY.direction, atol=1e-6)


def test_hu_clipped_to_default_range_and_overridable(tmp_path, volume):
    path = write_scan(tmp_path / "a.mhd", volume, GEOMETRY)
    assert read_image(path).hu.min() == -1000 and read_image(path).hu.max() == 1000
    narrow = read_image(path, hu_range=(-500, 400)).hu
    assert narrow.min() == -500 and narrow.max() == 400


def test_clip_hu_rounds_floats():
    out = clip_hu(np.array([-1234.6, -0.4, 0.6, 2000.0]))
    assert out.dtype == np.int16 and out.tolist() == [-1000, 0, 1, 1000]


def test_clip_hu_copies_a_read_only_view():
    # read_image hands it a view of SimpleITK's buffer, which dies with the image.
    source = np.array([-3024, -500, 0, 3000], dtype=np.int16)
    view = source[:]
    view.flags.writeable = False
    out = clip_hu(view)
    assert out.dtype == np.int16 and out.tolist() == [-1000, -500, 0, 1000]
    assert out.flags.writeable and not np.shares_memory(out, source)
    assert not np.shares_memory(clip_hu(view, None), source)


def test_crop_keeps_candidate_at_centre_everywhere():
    # Each voxel's value encodes its own position, so a chunk says where it was cut.
    shape = (10, 12, 14)
    i, r, c = np.indices(shape)
    volume = (i * 10000 + r * 100 + c).astype(np.int32)
    for center in [(5, 6, 7), (0, 0, 0), (9, 11, 13), (0, 11, 3), (-1, 5, 5)]:
        chunk = crop(volume, center, (4, 6, 8), fill=-1)
        assert chunk.shape == (4, 6, 8)
        inside = all(0 <= v < s for v, s in zip(center, shape))
        if inside:
            assert chunk[2, 3, 4] == volume[center], center
        else:
            assert chunk[2, 3, 4] == -1
        # every filled voxel is where the unshifted window says it is
        for (a, b, d), value in np.ndenumerate(chunk):
            src = (center[0] - 2 + a, center[1] - 3 + b, center[2] - 4 + d)
            if all(0 <= v < s for v, s in zip(src, shape)):
                assert value == volume[src]
            else:
                assert value == -1


def test_crop_rounds_half_up_and_returns_a_copy():
    volume = np.arange(10 * 10 * 10).reshape(10, 10, 10)
    chunk = crop(volume, (4.5, 4.49, 4.51), (1, 1, 1))
    assert chunk[0, 0, 0] == volume[5, 4, 5]
    chunk[...] = -7
    assert volume.min() == 0


def test_crop_entirely_outside_is_air():
    chunk = crop(np.zeros((5, 5, 5), np.int16), (100, 100, 100), (2, 2, 2))
    assert (chunk == AIR_HU).all()


def test_ct_crop_uses_patient_coordinates(volume):
    ct = Ct(clip_hu(volume), GEOMETRY, "x")
    center_irc = (7, 11, 23)
    chunk = ct.crop(GEOMETRY.irc_to_xyz(center_irc), (6, 8, 8))
    assert chunk[3, 4, 4] == ct.hu[center_irc]


@pytest.mark.parametrize("compress", [False, True])
def test_read_chunk_matches_crop_of_whole_volume(tmp_path, volume, compress):
    path = write_scan(tmp_path / "scan.mhd", volume, GEOMETRY, compress=compress)
    ct = read_image(path)
    for center_irc in [(10, 15, 20), (0, 0, 0), (19, 29, 39), (2.6, 28.4, 1), (50, 50, 50)]:
        center_xyz = GEOMETRY.irc_to_xyz(center_irc)
        np.testing.assert_array_equal(read_chunk(path, center_xyz, (8, 10, 12)), ct.crop(center_xyz, (8, 10, 12)))


def test_missing_file_and_missing_raw(tmp_path, volume):
    with pytest.raises(LunaError, match="no such file"):
        read_image(tmp_path / "nope.mhd")
    path = write_scan(tmp_path / "scan.mhd", volume, GEOMETRY)
    path.with_suffix(".raw").unlink()
    with pytest.raises(LunaError, match=r"scan\.raw is missing"):
        read_image(path)


def test_truncated_raw_is_a_clear_error(tmp_path, volume):
    path = write_scan(tmp_path / "scan.mhd", volume, GEOMETRY)
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    for read in (lambda: read_image(path), lambda: read_chunk(path, (0.0, 0.0, 0.0))):
        with pytest.raises(LunaError, match=r"scan\.raw: holds 1000 bytes .*scan\.mhd.* needs 48000: .*truncated") as err:
            read()
        assert "No such file" not in str(err.value)


@pytest.mark.parametrize("pixel_type", ["sitkInt8", "sitkUInt8", "sitkInt16", "sitkUInt16", "sitkInt32",
                                        "sitkUInt32", "sitkInt64", "sitkUInt64", "sitkFloat32", "sitkFloat64"])
@pytest.mark.parametrize("name, compress", [("a.mhd", False), ("a.mhd", True), ("a.mha", False), ("a.mha", True)])
def test_metaimage_check_accepts_what_simpleitk_writes(tmp_path, pixel_type, name, compress):
    from luna.io.image import check_metaimage

    image = sitk.Image([5, 4, 3], getattr(sitk, pixel_type))
    sitk.WriteImage(image, str(tmp_path / name), useCompression=compress)
    header = check_metaimage(tmp_path / name)
    assert header.size_xyz == (5, 4, 3) and header.compressed == compress
    assert read_image(tmp_path / name).hu.shape == (3, 4, 5)


def test_nan_voxels_are_an_error_in_every_float_format(tmp_path, volume):
    # ITK's NIfTI reader turns NaN into 0 (0 HU: soft tissue); MetaImage keeps it.
    floats = volume.astype(np.float32)
    floats[3, 4, 5] = np.nan
    floats[6, 7, 8] = -np.inf
    for name in ("f.nii", "f.nii.gz", "f.mhd", "f.mha"):
        path = write_scan(tmp_path / name, floats, GEOMETRY)
        with pytest.raises(LunaError, match=rf"{name}: 2 voxel\(s\) are NaN or infinite"):
            read_image(path)
        with pytest.raises(LunaError, match="NaN or infinite"):
            read_chunk(path, GEOMETRY.irc_to_xyz((5, 5, 5)))
    assert read_image(write_scan(tmp_path / "ok.nii.gz", volume.astype(np.float64), GEOMETRY)).hu.shape == volume.shape


def test_truncated_or_damaged_nifti_is_an_error(tmp_path, volume):
    # ITK reads a truncated .nii.gz without a word, the missing voxels as 0.
    for name in ("t.nii", "t.nii.gz"):
        path = write_scan(tmp_path / name, volume, GEOMETRY, compress=name.endswith(".gz"))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(LunaError, match=rf"{name}: .*truncated"):
            read_image(path)
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(LunaError, match="noise.nii.gz: not a usable NIfTI"):
        read_image(path)


def test_corrupt_compressed_metaimage_is_an_error(tmp_path, volume):
    # ITK prints "Uncompress failed" and returns zeros; luna makes it an error.
    path = write_scan(tmp_path / "c.mhd", volume, GEOMETRY, compress=True)
    data = bytearray((tmp_path / "c.zraw").read_bytes())
    data[10:-10] = bytes(len(data) - 20)
    (tmp_path / "c.zraw").write_bytes(bytes(data))
    with pytest.raises(LunaError, match="c.mhd"):
        read_image(path)
    # Without CompressedDataSize the stream itself is measured.
    (tmp_path / "c.zraw").write_bytes(zlib.compress(volume.tobytes())[:-40])
    path.write_text("".join(line for line in path.read_text().splitlines(True) if "CompressedDataSize" not in line))
    with pytest.raises(LunaError, match=r"c\.zraw: the compressed data is damaged or truncated"):
        read_image(path)
    (tmp_path / "c.zraw").write_bytes(zlib.compress(volume.tobytes()))
    np.testing.assert_array_equal(read_image(path, hu_range=None).hu, volume)


def test_non_image_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.mha"
    path.write_text("not an image")
    with pytest.raises(LunaError, match="notes.mha"):
        load_ct(path)


def test_to_sitk_round_trip(tmp_path, volume):
    ct = Ct(clip_hu(volume), GEOMETRY, "1.2")
    sitk.WriteImage(ct.to_sitk(), str(tmp_path / "1.2.mha"))
    again = read_image(tmp_path / "1.2.mha")
    np.testing.assert_array_equal(again.hu, ct.hu)
    np.testing.assert_allclose(again.geometry.direction, GEOMETRY.direction)


def test_ct_chunks_repeat_the_end_slices_and_pad_in_plane_with_air():
    from luna.ct import AIR_HU, crop

    volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    # slices -2 .. 3: the first slice three times, then 1, 2, 3
    chunk = crop(volume, (1, 3, 3), (6, 4, 4), repeat_slices=True)
    for k, index in enumerate([0, 0, 0, 1, 2, 3]):
        assert (chunk[k] == volume[index, 1:5, 1:5]).all()
    # past the last slice and the first rows: the last slice repeats, the rows outside are air
    chunk = crop(volume, (4, 0, 0), (4, 4, 4), repeat_slices=True)
    assert (chunk[3] == chunk[2]).all() and (chunk[:, :2] == AIR_HU).all()
    assert (chunk[0, 2:, 2:] == volume[2, :2, :2]).all()
    # without repeat_slices (2D windows, masks) the outside is the fill everywhere
    assert (crop(volume, (1, 3, 3), (6, 4, 4))[:2] == AIR_HU).all()
