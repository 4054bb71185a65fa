package recording

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// npyMagic opens every .npy file: the magic string and format version 1.0.
const npyMagic = "\x93NUMPY\x01\x00"

// npyCountDigits is the room kept in a fixed-size header for the record
// count, so that the header can be rewritten in place as the file grows.
const npyCountDigits = 20

// npyHeaderSize is the total size (magic, length and dict, padded) of a .npy
// header for dtype descr with room for a 20-digit count: a multiple of 64, as
// numpy writes it, so that the data starts aligned.
func npyHeaderSize(descr string) int { return npyHeaderSizeDims(descr, "") }

// npyHeaderSizeDims is npyHeaderSize for records that are arrays
// themselves: dims is the rest of the shape after the count, as text (", 4,
// 40" for shape (count, 4, 40)), "" for a one-dimensional array.
func npyHeaderSizeDims(descr, dims string) int {
	n := len(npyMagic) + 2 + len(npyDict(descr, "", dims)) + npyCountDigits + 1
	return (n + 63) / 64 * 64
}

// npyDict is the header dict with count (and dims) spliced in as text.
func npyDict(descr, count, dims string) string {
	if dims == "" {
		dims = ","
	}
	return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + count + dims + "), }"
}

// appendNpyHeader appends a .npy 1.0 header of exactly size bytes describing
// a one-dimensional array of count records of dtype descr. It does not
// allocate when dst has room for size more bytes.
func appendNpyHeader(dst []byte, size int, descr string, count int64) []byte {
	return appendNpyHeaderDims(dst, size, descr, count, "")
}

// appendNpyHeaderDims is appendNpyHeader for an array of shape (count +
// dims) (see npyHeaderSizeDims).
func appendNpyHeaderDims(dst []byte, size int, descr string, count int64, dims string) []byte {
	if dims == "" {
		dims = ","
	}
	start := len(dst)
	dst = append(dst, npyMagic...)
	dst = binary.LittleEndian.AppendUint16(dst, uint16(size-len(npyMagic)-2))
	dst = append(dst, "{'descr': '"...)
	dst = append(dst, descr...)
	dst = append(dst, "', 'fortran_order': False, 'shape': ("...)
	dst = strconv.AppendInt(dst, count, 10)
	dst = append(dst, dims...)
	dst = append(dst, "), }"...)
	for len(dst)-start < size-1 {
		dst = append(dst, ' ')
	}
	return append(dst, '\n')
}

// recordFile is an output file written in whole records of a fixed size,
// optionally behind a .npy header whose count is rewritten in place.
//
// Records are collected in a buffer and written to the file only in whole
// records, so a killed process never leaves half a record (for
// continuous.dat: half a sample frame) on disk. The header is rewritten only
// by writeHeader, after flush, so it never claims more records than the file
// holds.
type recordFile struct {
	path       string
	descr      string // numpy dtype; "" for a headerless file (continuous.dat)
	dims       string // the shape after the count, ", 4, 40" (spike waveforms); "" for 1-D
	recordSize int
	headerSize int
	// lazy files are created on disk at their first flush and only flushed
	// when asked (their buffer grows instead): event files, which must not
	// exist before they hold an event.
	lazy bool
	// open opens the file (os.OpenFile when nil): Config.OpenFile.
	open func(name string, flag int, perm os.FileMode) (File, error)

	f      File
	buf    []byte
	header []byte
	count  int64 // records appended, on disk or buffered
	onDisk int64 // records written to the file
	inHead int64 // count the header on disk claims
}

// newRecordFile prepares a record file. A file that is not lazy is created at
// once (it must not exist: a recording is never written over). bufRecords is
// the buffer size in records.
func newRecordFile(path, descr string, recordSize, bufRecords int, lazy bool) (*recordFile, error) {
	w := &recordFile{
		path:       path,
		descr:      descr,
		recordSize: recordSize,
		lazy:       lazy,
		buf:        make([]byte, 0, recordSize*max(bufRecords, 1)),
	}
	if descr != "" {
		w.headerSize = npyHeaderSize(descr)
		w.header = make([]byte, 0, w.headerSize)
	}
	if !lazy {
		if err := w.create(); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// create makes the file (which must not exist yet) with a header claiming
// zero records.
func (w *recordFile) create() error {
	if err := os.MkdirAll(filepath.Dir(w.path), 0o755); err != nil {
		return fileError("create folder", filepath.Dir(w.path), err)
	}
	var f File
	var err error
	if w.open != nil {
		f, err = w.open(w.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	} else {
		var of *os.File
		if of, err = os.OpenFile(w.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644); err == nil {
			f = of
		}
	}
	if err != nil {
		if os.IsExist(err) {
			return fmt.Errorf("recording: create %s: the file already exists; a recording folder is never written twice — give each record start a new recording number (recording.Session does)", w.path)
		}
		return fileError("create", w.path, err)
	}
	w.f = f
	if w.descr != "" {
		w.header = appendNpyHeaderDims(w.header[:0], w.headerSize, w.descr, 0, w.dims)
		if _, err := f.Write(w.header); err != nil {
			return fileError("write", w.path, err)
		}
	}
	return nil
}

// next returns room for n more records in the buffer, writing the buffer out
// first when it is full (for files that are not lazy). The buffer grows when
// n records do not fit in it even when empty (or, for lazy files, whenever
// it is full); in steady state it does not allocate.
func (w *recordFile) next(n int) ([]byte, error) {
	need := n * w.recordSize
	if len(w.buf)+need > cap(w.buf) && !w.lazy && len(w.buf) > 0 {
		if err := w.flush(); err != nil {
			return nil, err
		}
	}
	if len(w.buf)+need > cap(w.buf) {
		grown := make([]byte, len(w.buf), max(2*cap(w.buf), len(w.buf)+need))
		copy(grown, w.buf)
		w.buf = grown
	}
	l := len(w.buf)
	w.buf = w.buf[:l+need]
	w.count += int64(n)
	return w.buf[l : l+need], nil
}

// flush writes the buffered records to the file, creating a lazy file first.
func (w *recordFile) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	if w.f == nil {
		if err := w.create(); err != nil {
			return err
		}
	}
	n, err := w.f.Write(w.buf)
	if err != nil {
		// Keep the file in whole records: drop a partly written record so
		// that a later flush or the header stay consistent.
		if whole := n - n%w.recordSize; whole != n {
			_ = w.f.Truncate(int64(w.headerSize) + (w.onDisk+int64(whole/w.recordSize))*int64(w.recordSize))
			_, _ = w.f.Seek(0, 2)
			n = whole
		}
		w.onDisk += int64(n / w.recordSize)
		w.buf = w.buf[:copy(w.buf, w.buf[n:])]
		return fileError("write", w.path, err)
	}
	w.onDisk += int64(n / w.recordSize)
	w.buf = w.buf[:0]
	return nil
}

// writeHeader rewrites the header in place with the number of records on
// disk. Call flush first.
func (w *recordFile) writeHeader() error {
	if w.descr == "" || w.f == nil || w.inHead == w.onDisk {
		return nil
	}
	w.header = appendNpyHeaderDims(w.header[:0], w.headerSize, w.descr, w.onDisk, w.dims)
	if _, err := w.f.WriteAt(w.header, 0); err != nil {
		return fileError("write header of", w.path, err)
	}
	w.inHead = w.onDisk
	return nil
}

// sync makes what was written to the file durable (FsyncCheckpoint).
func (w *recordFile) sync() error {
	if w.f == nil {
		return nil
	}
	if err := w.f.Sync(); err != nil {
		return fileError("sync", w.path, err)
	}
	return nil
}

// close syncs and closes the file. The caller flushes and writes headers
// first.
func (w *recordFile) close() error {
	if w.f == nil {
		return nil
	}
	f := w.f
	w.f = nil
	if err := f.Sync(); err != nil {
		f.Close()
		return fileError("sync", w.path, err)
	}
	if err := f.Close(); err != nil {
		return fileError("close", w.path, err)
	}
	return nil
}

// abandon closes the file without writing anything more.
func (w *recordFile) abandon() {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}

// writeFileAtomic replaces path with data: it writes a temporary file in the
// same folder, syncs it and renames it over path, so a reader (or a crash)
// sees the old content or the new, never a mix.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fileError("create", tmp, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return fileError("write", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return fileError("sync", tmp, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fileError("close", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fileError("rename "+tmp+" to", path, err)
	}
	return nil
}

// npyBytes returns a complete .npy file: a one-dimensional array of the
// given records of dtype descr, each recordSize bytes, concatenated in data.
func npyBytes(descr string, count int64, data []byte) []byte {
	size := npyHeaderSize(descr)
	out := make([]byte, 0, size+len(data))
	out = appendNpyHeader(out, size, descr, count)
	return append(out, data...)
}

// fileError is err about the file at path, as "recording: <op> <path>:
// <cause>", without the repetition of the path an *os.PathError carries.
func fileError(op, path string, err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		err = le.Err
	}
	return fmt.Errorf("recording: %s %s: %w", op, path, err)
}
