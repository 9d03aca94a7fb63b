#!/usr/bin/env python3
"""DICOM test data and probes for the gateway's end-to-end tests (pydicom 3, pynetdicom 3).

usage: dicom_tool.py <command> ...
  samples OUTDIR                 copy pydicom's CT_small, MR_small, SC_rgb_jpeg_dcmtk, SC_rgb_rle and
                                 JPEG2000 into OUTDIR, plus MR_small_implicit.dcm with a UID of its own;
                                 prints one JSON object per file
  multiframe OUT MIB             a multi-frame grayscale word secondary capture of about MIB MiB
                                 (512x512x16-bit frames), explicit VR LE; prints its SOP Instance UID
  batch OUTDIR N [SIZE]          N CT instances (SIZExSIZE, default 64, 16-bit; one study), fresh UIDs;
                                 prints their UIDs
  truncate SRC OUT KEEP          SRC with a fresh SOP Instance UID, cut KEEP bytes into its data set;
                                 prints the UID
  compare A B                    whether the data sets of A and B are equal element by element
                                 (ignoring a trailing (FFFC,FFFC) padding element) and their pixel data
                                 identical; prints JSON
  send-raw PORT CALLED CALLING FILE
                                 C-STORE FILE as its bytes are (pynetdicom sends a path unparsed);
                                 prints JSON with the status
  probe PORT CALLED CALLING      propose non-storage contexts (Q/R FIND, MPPS), try a C-FIND and a
                                 C-STORE of a non-storage SOP class, then C-ECHO; prints JSON
"""
import hashlib
import json
import os
import shutil
import sys

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

SAMPLES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm"]


def describe(path):
    ds = dcmread(path, stop_before_pixels=True)
    return {
        "file": path,
        "sop_class_uid": str(ds.file_meta.MediaStorageSOPClassUID),
        "sop_instance_uid": str(ds.file_meta.MediaStorageSOPInstanceUID),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "modality": str(ds.get("Modality", "")),
    }


def samples(outdir):
    os.makedirs(outdir, exist_ok=True)
    for name in SAMPLES:
        out = os.path.join(outdir, name)
        shutil.copyfile(get_testdata_file(name), out)
        print(json.dumps(describe(out)))
    # MR_small_implicit shares MR_small's SOP Instance UID: give it one of its own.
    ds = dcmread(get_testdata_file("MR_small_implicit.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = os.path.join(outdir, "MR_small_implicit.dcm")
    ds.save_as(out, enforce_file_format=True)
    print(json.dumps(describe(out)))


def multiframe(out, mib):
    rows = cols = 512
    frame = rows * cols * 2
    frames = max(1, mib * 1024 * 1024 // frame)
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Test^Large"
    ds.PatientID = "LARGE1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    seed = os.urandom(frame)
    # Every frame different (rotated), so a dropped or repeated chunk cannot go unnoticed.
    ds.PixelData = b"".join(seed[(i * 2) % frame:] + seed[:(i * 2) % frame] for i in range(frames))
    ds.save_as(out, enforce_file_format=True)
    print(uid)


def batch(outdir, n, size):
    os.makedirs(outdir, exist_ok=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows = ds.Columns = size
    base = os.urandom(size * size * 2)
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.PixelData = base[i * 2:] + base[:i * 2]
        ds.save_as(os.path.join(outdir, f"ct{i:05d}.dcm"), enforce_file_format=True)
        print(uid)


def truncate(src, out, keep):
    ds = dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    with open(out, "rb") as f:
        data = f.read()
    meta_len = int.from_bytes(data[140:144], "little")
    offset = 144 + meta_len
    with open(out, "wb") as f:
        f.write(data[: offset + keep])
    print(ds.SOPInstanceUID)


def pixel_digest(ds):
    if "PixelData" not in ds:
        return None
    return hashlib.sha256(ds["PixelData"].value).hexdigest()


def compare(a, b):
    da, db = dcmread(a), dcmread(b)
    for ds in (da, db):
        if (0xFFFC, 0xFFFC) in ds:
            del ds[0xFFFC, 0xFFFC]
    differing = sorted(
        str(tag) for tag in set(da.keys()) | set(db.keys()) if tag not in da or tag not in db or da[tag] != db[tag]
    )
    print(json.dumps({
        "equal": not differing and pixel_digest(da) == pixel_digest(db),
        "differing_tags": differing[:20],
        "pixels_a": pixel_digest(da),
        "pixels_b": pixel_digest(db),
        "sop_instance_uid_a": str(da.get("SOPInstanceUID", "")),
        "sop_instance_uid_b": str(db.get("SOPInstanceUID", "")),
    }))


def association(port, called, calling, contexts):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", int(port), ae_title=called)


def status_of(rsp):
    return None if rsp is None or "Status" not in rsp else int(rsp.Status)


def send_raw(port, called, calling, path):
    info = describe(path)
    assoc = association(port, called, calling, [(info["sop_class_uid"], [info["transfer_syntax"]])])
    out = {"established": assoc.is_established, "status": None}
    if assoc.is_established:
        out["status"] = status_of(assoc.send_c_store(path))
        assoc.release()
    print(json.dumps(out))


FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R Information Model - FIND
MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step (not a storage class)
VERIFICATION = "1.2.840.10008.1.1"


def probe(port, called, calling):
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assoc = association(port, called, calling, [(VERIFICATION, syntaxes), (FIND, syntaxes), (MPPS, syntaxes)])
    out = {"established": assoc.is_established, "contexts": {}, "find": None, "store": None, "echo": None}
    if not assoc.is_established:
        print(json.dumps(out))
        return
    for cx in assoc.accepted_contexts:
        out["contexts"][str(cx.abstract_syntax)] = "accepted"
    for cx in assoc.rejected_contexts:
        out["contexts"][str(cx.abstract_syntax)] = "rejected"
    if out["contexts"].get(FIND) == "accepted":
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "*"
        statuses = []
        try:
            for status, _ in assoc.send_c_find(query, FIND):
                statuses.append(status_of(status))
        except Exception as err:  # noqa: BLE001 - reported to the test
            statuses.append(f"error: {err}")
        out["find"] = statuses
    if out["contexts"].get(MPPS) == "accepted" and assoc.is_established:
        ds = Dataset()
        ds.SOPClassUID = MPPS
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        try:
            out["store"] = status_of(assoc.send_c_store(ds))
        except Exception as err:  # noqa: BLE001
            out["store"] = f"error: {err}"
    if assoc.is_established:
        out["echo"] = status_of(assoc.send_c_echo())
        assoc.release()
    print(json.dumps(out))


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    command, args = argv[1], argv[2:]
    if command == "samples":
        samples(*args)
    elif command == "multiframe":
        multiframe(args[0], int(args[1]))
    elif command == "batch":
        batch(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 64)
    elif command == "truncate":
        truncate(args[0], args[1], int(args[2]))
    elif command == "compare":
        compare(*args)
    elif command == "send-raw":
        send_raw(*args)
    elif command == "probe":
        probe(*args)
    else:
        sys.exit(f"unknown command {command!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
