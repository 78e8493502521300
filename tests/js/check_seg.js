#!/usr/bin/env node
// Parse a DICOM-SEG with dcmjs (the library OHIF builds on) and check that every frame maps to a
// source slice: its ReferencedSOPInstanceUID is one of SOURCE_DIR's instances and its
// ImagePositionPatient is that instance's. Then load it with dcmjs' Cornerstone adapter
// (Segmentation.generateToolState, the loader OHIF's segmentation support grew from) on the source
// slices sorted along the slice normal; with LABELMAP_OUT, write its label map there (uint16, little
// endian, [slice][row][column], segment numbers). Prints a JSON summary; exit status 1 on any problem.
//
//   node tests/js/check_seg.js SEG SOURCE_DIR [LABELMAP_OUT]
"use strict";

const fs = require("fs");
const path = require("path");
const dcmjs = require("dcmjs");

dcmjs.log.setLevel("error");

function read(file) {
  const buffer = fs.readFileSync(file);
  const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const message = dcmjs.data.DicomMessage.readFile(arrayBuffer);
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.meta);
  return dataset;
}

const first = (value) => (Array.isArray(value) ? value[0] : value);

function files(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    return entry.isDirectory() ? files(full) : [full];
  });
}

// Source slices as Cornerstone image ids, sorted along the slice normal, and a metadata provider.
function loadWithAdapter(segPath, sources, problems) {
  const datasets = [...sources.values()];
  const iop = datasets[0].ImageOrientationPatient.map(Number);
  const normal = [
    iop[1] * iop[5] - iop[2] * iop[4],
    iop[2] * iop[3] - iop[0] * iop[5],
    iop[0] * iop[4] - iop[1] * iop[3],
  ];
  const along = (ds) => ds.ImagePositionPatient.map(Number).reduce((sum, v, i) => sum + v * normal[i], 0);
  datasets.sort((a, b) => along(a) - along(b));
  const byId = new Map(datasets.map((ds) => [`file:${ds._file}`, ds]));
  const provider = {
    get(type, imageId) {
      const ds = byId.get(imageId);
      if (!ds) return undefined;
      const o = ds.ImageOrientationPatient.map(Number);
      switch (type) {
        case "imagePlaneModule":
          return { rowCosines: o.slice(0, 3), columnCosines: o.slice(3), rows: ds.Rows, columns: ds.Columns,
                   imagePositionPatient: ds.ImagePositionPatient.map(Number), frameOfReferenceUID: ds.FrameOfReferenceUID };
        case "generalSeriesModule":
          return { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality };
        case "imagePixelModule":
          return { rows: ds.Rows, columns: ds.Columns };
        case "sopCommonModule":
          return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
        case "instance":
          return ds;
        default:
          return undefined;
      }
    },
  };
  const imageIds = [...byId.keys()];
  const warn = console.warn;
  console.warn = (...args) => problems.push(`dcmjs: ${args.join(" ")}`);
  try {
    const buffer = fs.readFileSync(segPath);
    const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
    const state = dcmjs.adapters.Cornerstone.Segmentation.generateToolState(imageIds, arrayBuffer, provider);
    const slicesWithSegments = state.segmentsOnFrame.filter((s) => s && s.length).length;
    return { labelmap: state.labelmapBufferArray[0], labelmaps: state.labelmapBufferArray.length, slicesWithSegments };
  } catch (e) {
    problems.push(`dcmjs adapter: ${e.message}`);
    return null;
  } finally {
    console.warn = warn;
  }
}

function main() {
  const [segPath, sourceDir, labelmapOut] = process.argv.slice(2);
  if (!segPath || !sourceDir) {
    console.error("usage: check_seg.js SEG SOURCE_DIR");
    process.exit(2);
  }
  const problems = [];
  const seg = read(segPath);
  const sources = new Map();
  for (const file of files(sourceDir)) {
    let ds;
    try {
      ds = read(file);
    } catch (e) {
      continue; // not DICOM
    }
    if (ds.SOPInstanceUID && ds.Modality !== "SEG") sources.set(ds.SOPInstanceUID, ds);
    if (ds.SOPInstanceUID && ds.Modality !== "SEG") ds._file = file;
  }
  const perFrame = seg.PerFrameFunctionalGroupsSequence || [];
  const frames = Number(seg.NumberOfFrames);
  if (perFrame.length !== frames) problems.push(`${perFrame.length} per-frame items for ${frames} frames`);
  const segments = new Set((seg.SegmentSequence || []).map((s) => Number(s.SegmentNumber)));
  const shared = first(seg.SharedFunctionalGroupsSequence) || {};
  const referenced = new Set();
  perFrame.forEach((item, index) => {
    const derivation = first(item.DerivationImageSequence);
    const source = derivation && first(derivation.SourceImageSequence);
    const uid = source && source.ReferencedSOPInstanceUID;
    if (!uid || !sources.has(uid)) {
      problems.push(`frame ${index + 1}: references ${uid || "nothing"}, not a source instance`);
      return;
    }
    referenced.add(uid);
    const position = first(item.PlanePositionSequence).ImagePositionPatient.map(Number);
    const expected = sources.get(uid).ImagePositionPatient.map(Number);
    if (position.some((v, i) => Math.abs(v - expected[i]) > 1e-3)) {
      problems.push(`frame ${index + 1}: at ${position}, its source at ${expected}`);
    }
    const identification = first(item.SegmentIdentificationSequence || shared.SegmentIdentificationSequence);
    if (seg.SegmentationType !== "LABELMAP") {
      const number = identification && Number(identification.ReferencedSegmentNumber);
      if (!segments.has(number)) problems.push(`frame ${index + 1}: segment ${number} is not described`);
    }
  });
  const rows = Number(seg.Rows);
  const columns = Number(seg.Columns);
  const native = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"].includes(seg._meta.TransferSyntaxUID);
  const fragments = Array.isArray(seg.PixelData) ? seg.PixelData : [seg.PixelData];
  const pixelBytes = fragments.reduce((sum, f) => sum + (f ? f.byteLength : 0), 0);
  const needed = native ? Math.ceil((frames * rows * columns * Number(seg.BitsAllocated)) / 8) : 1;
  if (pixelBytes < needed) problems.push(`pixel data has ${pixelBytes} bytes, ${frames} frames need ${needed}`);
  const adapter = seg.SegmentationType === "BINARY" ? loadWithAdapter(segPath, sources, problems) : null;
  if (adapter && labelmapOut) fs.writeFileSync(labelmapOut, Buffer.from(adapter.labelmap));
  const summary = {
    ok: problems.length === 0,
    sopClass: seg.SOPClassUID,
    segmentationType: seg.SegmentationType,
    frames,
    segments: segments.size,
    sourceInstances: sources.size,
    referencedInstances: referenced.size,
    frameOfReference: seg.FrameOfReferenceUID,
    adapterLabelmaps: adapter ? adapter.labelmaps : null,
    adapterSlicesWithSegments: adapter ? adapter.slicesWithSegments : null,
    problems: problems.slice(0, 20),
  };
  console.log(JSON.stringify(summary));
  process.exit(summary.ok ? 0 : 1);
}

main();
