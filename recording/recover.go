package recording

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// UnfinishedMarker is the file a Recorder creates in a recording folder
// before anything else and removes once it has finalised the recording. A
// recording folder that holds it was not finalised (the process was killed,
// crashed or lost power, or the disk filled up): Recover makes it
// consistent. It holds the structure.oebin the recording would have with
// every stream and event channel it may hold, so that a recording killed
// before its first checkpoint can be described too. Readers (neo,
// open-ephys-python-tools, SpikeInterface) ignore it.
const UnfinishedMarker = ".ephysd-unfinished.json"

// marker is the content of UnfinishedMarker.
type marker struct {
	Note string `json:"note"`
	// PID, BootID and ProcessStart identify the process writing the
	// recording, so that recovery leaves a recording in progress alone.
	PID          int    `json:"pid"`
	BootID       string `json:"boot_id"`
	ProcessStart uint64 `json:"process_start"` // field 22 of /proc/<pid>/stat
	Started      string `json:"started"`
	// Fsync is the recorder's FsyncPolicy.
	Fsync string `json:"fsync"`
	// Oebin is structure.oebin listing every continuous stream, event
	// channel and spike channel the recording may hold.
	Oebin json.RawMessage `json:"structure_oebin"`
}

const markerNote = "ephysd is writing this recording, or was when it stopped without finalising it: " +
	"`ephysd recover <this folder>` (or the next start of ephysd) makes it consistent and removes this file"

// RecoveryReport is what Recover found and did, per recording folder.
type RecoveryReport struct {
	Recordings []*RecordingRecovery
}

// RecordingRecovery is the recovery of one recording folder.
type RecordingRecovery struct {
	Dir string
	// Unfinished is set when the folder held UnfinishedMarker: the
	// recorder never finalised it.
	Unfinished bool
	// Changes are the files changed, in the order they were changed.
	Changes []FileChange
	// Warnings are inconsistencies left as they are (nothing safe to do).
	Warnings []string
	// Err is what could not be fixed; the marker (if any) is then kept.
	Err error
}

// FileChange is one change to one file.
type FileChange struct {
	Path string
	// What says what was changed and why, for people.
	What string
	// BytesDropped is how many bytes were cut off the end of the file.
	BytesDropped int64
	// RecordsDropped is how many whole records (sample frames for
	// continuous.dat, rows for .npy files) were dropped, including those
	// past the count the .npy header claimed.
	RecordsDropped int64
}

// Changed reports whether any file was changed.
func (r *RecoveryReport) Changed() bool {
	for _, rr := range r.Recordings {
		if len(rr.Changes) > 0 {
			return true
		}
	}
	return false
}

// Err joins the errors of the recordings that could not be fixed.
func (r *RecoveryReport) Err() error {
	var errs []error
	for _, rr := range r.Recordings {
		if rr.Err != nil {
			errs = append(errs, rr.Err)
		}
	}
	return errors.Join(errs...)
}

// String is the report for people: one line per recording, then one per
// change or warning.
func (r *RecoveryReport) String() string {
	var b strings.Builder
	for _, rr := range r.Recordings {
		b.WriteString(rr.String())
	}
	return b.String()
}

// String is the recovery of one recording for people.
func (rr *RecordingRecovery) String() string {
	var b strings.Builder
	state := "finalised"
	if rr.Unfinished {
		state = "not finalised"
	}
	switch {
	case rr.Err != nil:
		fmt.Fprintf(&b, "%s (%s): NOT FIXED: %v\n", rr.Dir, state, rr.Err)
	case len(rr.Changes) == 0 && rr.Unfinished:
		fmt.Fprintf(&b, "%s (%s): consistent, no data lost; marked finished\n", rr.Dir, state)
	case len(rr.Changes) == 0:
		fmt.Fprintf(&b, "%s (%s): consistent, nothing to do\n", rr.Dir, state)
	default:
		fmt.Fprintf(&b, "%s (%s): %d files fixed\n", rr.Dir, state, len(rr.Changes))
	}
	for _, c := range rr.Changes {
		rel, err := filepath.Rel(rr.Dir, c.Path)
		if err != nil {
			rel = c.Path
		}
		fmt.Fprintf(&b, "  %s: %s\n", rel, c.What)
	}
	for _, w := range rr.Warnings {
		fmt.Fprintf(&b, "  warning: %s\n", w)
	}
	return b.String()
}

// recordingDirName matches a recording folder's name.
var recordingDirName = regexp.MustCompile(`^recording[0-9]+$`)

// Recover makes every recording below dir consistent: dir may be a parent
// folder of sessions, a session folder, a Record Node folder, an
// experiment folder or a recording folder. For each recording it
//
//   - cuts each continuous.dat to a whole number of sample frames and,
//     with its sample_numbers.npy and timestamps.npy, to the number of
//     samples all three hold (dropping rows whose sample number or
//     timestamp does not increase: blocks a power cut left zero-filled);
//   - cuts the .npy files of each event folder (states, sample_numbers,
//     timestamps, full_words, text) and of each spike folder to the number
//     of rows they all hold;
//   - rewrites every .npy header to the number of rows its file holds;
//   - rewrites structure.oebin to list the streams and event channels that
//     hold data (from the UnfinishedMarker's description when the recorder
//     died before writing it), or removes it from a recording that holds no
//     sample (readers cannot open an empty stream);
//   - removes leftover temporary files and, when all is consistent, the
//     UnfinishedMarker.
//
// It never adds or changes a sample, an event or a row: it only drops
// what cannot be made whole. It is idempotent and changes nothing in a
// consistent recording. A recording whose marker names a process that is
// still running is left alone (an error in the report). The error is
// non-nil when dir cannot be read or holds no recording; the report's Err
// joins what could not be fixed.
func Recover(dir string) (*RecoveryReport, error) {
	dirs, err := findRecordings(dir, false)
	if err != nil {
		return nil, err
	}
	if len(dirs) == 0 {
		return nil, fmt.Errorf("recording: recover %s: no recording folder (experiment<N>/recording<M>) found below it — give a folder that ephysd or Open Ephys recorded into", dir)
	}
	rep := &RecoveryReport{}
	for _, d := range dirs {
		rep.Recordings = append(rep.Recordings, recoverRecording(d))
	}
	return rep, nil
}

// RecoverUnfinished recovers the recordings below root that hold an
// UnfinishedMarker (the recordings a killed or crashed ephysd left), as a
// daemon does when it starts. A missing root holds nothing to recover.
// Recordings of a process that is still running are left alone and
// reported as errors.
func RecoverUnfinished(root string) (*RecoveryReport, error) {
	rep := &RecoveryReport{}
	if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
		return rep, nil
	}
	dirs, err := findRecordings(root, true)
	if err != nil {
		return nil, err
	}
	for _, d := range dirs {
		rep.Recordings = append(rep.Recordings, recoverRecording(d))
	}
	return rep, nil
}

// findRecordings lists the recording folders at or below dir, sorted; with
// onlyUnfinished, those holding an UnfinishedMarker. It does not descend
// into recording folders.
func findRecordings(dir string, onlyUnfinished bool) ([]string, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fileError("read", dir, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("recording: recover %s: not a folder — give a recording folder or a folder above it", dir)
	}
	var out []string
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == dir {
				return err
			}
			return nil // an unreadable folder below: skip it
		}
		if !d.IsDir() {
			return nil
		}
		switch d.Name() {
		case "continuous", "events", "spikes":
			return fs.SkipDir
		}
		if !isRecordingDir(p) {
			return nil
		}
		if !onlyUnfinished || fileExists(filepath.Join(p, UnfinishedMarker)) {
			out = append(out, p)
		}
		return fs.SkipDir
	})
	if err != nil {
		return nil, fileError("read", dir, err)
	}
	sort.Strings(out)
	return out, nil
}

// isRecordingDir reports whether p looks like a recording folder: named
// recording<N> and holding structure.oebin, the marker or continuous/.
func isRecordingDir(p string) bool {
	if !recordingDirName.MatchString(filepath.Base(p)) {
		return false
	}
	for _, name := range []string{"structure.oebin", UnfinishedMarker, "continuous"} {
		if _, err := os.Lstat(filepath.Join(p, name)); err == nil {
			return true
		}
	}
	return false
}

// recoverer is the recovery of one recording folder in progress.
type recoverer struct {
	rr  *RecordingRecovery
	dir string
	// scan says which rows of continuous sample numbers and timestamps to
	// check for values that do not increase (what a power cut can leave):
	// scanAll every row, scanTail the rows past the count in the header,
	// scanNone none (the machine did not restart since the recorder wrote
	// them, so the kernel holds exactly what it wrote).
	scan int
}

const (
	scanAll = iota
	scanTail
	scanNone
)

func (rc *recoverer) change(path, what string, bytes, records int64) {
	rc.rr.Changes = append(rc.rr.Changes, FileChange{Path: path, What: what, BytesDropped: bytes, RecordsDropped: records})
}

func (rc *recoverer) warn(format string, args ...any) {
	rc.rr.Warnings = append(rc.rr.Warnings, fmt.Sprintf(format, args...))
}

func recoverRecording(dir string) *RecordingRecovery {
	rc := &recoverer{rr: &RecordingRecovery{Dir: dir}, dir: dir}
	if err := rc.run(); err != nil {
		rc.rr.Err = err
	}
	return rc.rr
}

func (rc *recoverer) run() error {
	dir := rc.dir
	markerPath := filepath.Join(dir, UnfinishedMarker)
	var desc []jsonField
	var fromMarker bool
	if data, err := os.ReadFile(markerPath); err == nil {
		rc.rr.Unfinished = true
		var m marker
		if err := json.Unmarshal(data, &m); err != nil {
			rc.warn("%s is unreadable (%v): using structure.oebin to describe the recording", UnfinishedMarker, err)
		} else {
			if m.PID > 0 && processRunning(m.PID, m.BootID, m.ProcessStart) {
				return fmt.Errorf("recording: %s is being recorded by process %d, which is still running: stop it (or let it finish) first", dir, m.PID)
			}
			switch {
			case m.BootID != "" && m.BootID == currentBootID():
				rc.scan = scanNone
			case FsyncPolicy(m.Fsync) == FsyncCheckpoint:
				rc.scan = scanTail // rows under the header were synced before it
			}
			if d, err := decodeObject(m.Oebin); err == nil {
				desc, fromMarker = d, true
			} else {
				rc.warn("%s holds no usable structure.oebin (%v): using structure.oebin", UnfinishedMarker, err)
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fileError("read", markerPath, err)
	}
	oebinPath := filepath.Join(dir, "structure.oebin")
	oldOebin, oebinErr := os.ReadFile(oebinPath)
	if oebinErr != nil && !errors.Is(oebinErr, fs.ErrNotExist) {
		return fileError("read", oebinPath, oebinErr)
	}
	if desc == nil && oebinErr == nil {
		d, err := decodeObject(oldOebin)
		if err != nil {
			if !rc.rr.Unfinished {
				return fmt.Errorf("recording: %s: not valid JSON (%v) and no %s describes the recording: it cannot be rebuilt — restore it from a backup or from a recording with the same streams", oebinPath, err, UnfinishedMarker)
			}
			return fmt.Errorf("recording: %s: not valid JSON (%v) and %s holds no description either", oebinPath, err, UnfinishedMarker)
		}
		desc = d
	} else if desc != nil && oebinErr == nil {
		// Channels the recorder listed since it wrote the marker (spike
		// electrodes appear as their first spike does) stay listed.
		if old, err := decodeObject(oldOebin); err == nil {
			desc = mergeEntries(desc, old, "events")
			desc = mergeEntries(desc, old, "spikes")
		}
	}
	rc.removeTemporaries()
	if desc == nil {
		// Nothing describes the recording: fine only if it holds no data.
		if n := datBytes(filepath.Join(dir, "continuous")); n > 0 {
			return fmt.Errorf("recording: %s holds samples but neither structure.oebin nor %s: the channel count of continuous.dat is unknown, so it cannot be checked — copy structure.oebin from a recording with the same source", dir, UnfinishedMarker)
		}
		rc.warn("no sample reached the disk: the recording is empty and readers skip it")
		return rc.finish(markerPath)
	}

	// Continuous streams.
	streams, err := arrayField(desc, "continuous")
	if err != nil {
		return fmt.Errorf("recording: %s: %w", rc.descName(fromMarker), err)
	}
	var keptStreams []json.RawMessage
	for _, raw := range streams {
		var e struct {
			FolderName  string  `json:"folder_name"`
			NumChannels int     `json:"num_channels"`
			SampleRate  float64 `json:"sample_rate"`
		}
		if err := json.Unmarshal(raw, &e); err != nil || e.FolderName == "" || e.NumChannels <= 0 {
			return fmt.Errorf("recording: %s: a continuous entry lacks folder_name or num_channels: %s", rc.descName(fromMarker), compactJSON(raw))
		}
		n, err := rc.recoverContinuous(filepath.Join(dir, "continuous", filepath.FromSlash(e.FolderName)), e.NumChannels)
		if err != nil {
			return err
		}
		if n > 0 {
			keptStreams = append(keptStreams, raw)
		} else if !fromMarker {
			rc.warn("continuous stream %s holds no sample: removed from structure.oebin (readers cannot open an empty stream)", e.FolderName)
		}
	}

	// Event and spike folders, whether described or not.
	rows := map[string]int64{} // folder → rows after recovery
	clean := map[string]bool{} // folder needed no change
	for _, top := range []string{"events", "spikes"} {
		folders, err := npyFolders(filepath.Join(dir, top))
		if err != nil {
			return err
		}
		for _, f := range folders {
			before := len(rc.rr.Changes)
			n, err := rc.recoverGroup(f, top == "events")
			if err != nil {
				return err
			}
			rows[f] = n
			clean[f] = len(rc.rr.Changes) == before
		}
	}
	folderOf := func(top string, raw json.RawMessage) string {
		name := entryFolder(raw)
		if name == "" {
			return ""
		}
		return filepath.Join(dir, top, filepath.FromSlash(name))
	}
	events, err := arrayField(desc, "events")
	if err != nil {
		return fmt.Errorf("recording: %s: %w", rc.descName(fromMarker), err)
	}
	var keptEvents []json.RawMessage
	listed := map[string]bool{}
	for _, raw := range events {
		f := folderOf("events", raw)
		listed[f] = true
		n, exists := rows[f]
		switch {
		case n > 0:
			keptEvents = append(keptEvents, raw)
		case fromMarker:
			// A channel the recording may have had, with no event on disk.
		case exists && clean[f]:
			keptEvents = append(keptEvents, raw)
			rc.warn("event channel %s holds no event: neo 0.11 cannot read a recording listing it", relOrSelf(dir, f))
		default:
			rc.warn("event channel %s holds no whole event: removed from structure.oebin", relOrSelf(dir, f))
		}
	}
	for f, n := range rows {
		if n > 0 && !listed[f] && strings.HasPrefix(f, filepath.Join(dir, "events")+string(filepath.Separator)) {
			rc.warn("%s holds %d events but nothing describes it: left out of structure.oebin", relOrSelf(dir, f), n)
		}
	}
	spikes, err := arrayField(desc, "spikes")
	if err != nil {
		return fmt.Errorf("recording: %s: %w", rc.descName(fromMarker), err)
	}
	var keptSpikes []json.RawMessage
	for _, raw := range spikes {
		f := folderOf("spikes", raw)
		if _, exists := rows[f]; exists || (!fromMarker && f == "") {
			keptSpikes = append(keptSpikes, raw)
		} else if !fromMarker {
			rc.warn("spike channel %s has no files: removed from structure.oebin", relOrSelf(dir, f))
		}
	}

	// structure.oebin.
	if len(keptStreams) == 0 {
		if oebinErr == nil {
			if err := os.Remove(oebinPath); err != nil {
				return fileError("remove", oebinPath, err)
			}
			rc.change(oebinPath, "removed: the recording holds no sample, and readers cannot open an empty stream", 0, 0)
		} else {
			rc.warn("no sample reached the disk: the recording is empty and readers skip it")
		}
		return rc.finish(markerPath)
	}
	doc := setField(desc, "continuous", keptStreams)
	doc = setField(doc, "events", keptEvents)
	doc = setField(doc, "spikes", keptSpikes)
	data, err := encodeObject(doc)
	if err != nil {
		return fmt.Errorf("recording: %s: %w", oebinPath, err)
	}
	switch {
	case oebinErr != nil:
		if err := writeOebinRecovered(oebinPath, data); err != nil {
			return err
		}
		rc.change(oebinPath, fmt.Sprintf("written from %s: %d continuous streams, %d event channels", UnfinishedMarker, len(keptStreams), len(keptEvents)), 0, 0)
	case !sameJSON(oldOebin, data):
		if err := writeOebinRecovered(oebinPath, data); err != nil {
			return err
		}
		rc.change(oebinPath, fmt.Sprintf("rewritten to list what the recording holds: %d continuous streams, %d event channels", len(keptStreams), len(keptEvents)), 0, 0)
	}
	return rc.finish(markerPath)
}

func (rc *recoverer) descName(fromMarker bool) string {
	if fromMarker {
		return filepath.Join(rc.dir, UnfinishedMarker)
	}
	return filepath.Join(rc.dir, "structure.oebin")
}

// finish removes the marker, making the recovered state durable first.
func (rc *recoverer) finish(markerPath string) error {
	if !rc.rr.Unfinished {
		return nil
	}
	if err := os.Remove(markerPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fileError("remove", markerPath, err)
	}
	syncDir(rc.dir)
	return nil
}

// temporaryNames are the files written through a temporary file (see
// writeFileAtomic) whose leftover .tmp a killed process may leave.
var temporaryNames = map[string]bool{
	"structure.oebin": true, "sync_messages.txt": true, "text.npy": true, UnfinishedMarker: true,
}

// removeTemporaries removes the leftover temporary files of a killed
// writeFileAtomic: the file they were to replace is complete either way.
func (rc *recoverer) removeTemporaries() {
	_ = filepath.WalkDir(rc.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".tmp") || !temporaryNames[strings.TrimSuffix(d.Name(), ".tmp")] {
			return nil
		}
		fi, _ := d.Info()
		if os.Remove(p) == nil {
			var size int64
			if fi != nil {
				size = fi.Size()
			}
			rc.change(p, "removed: temporary file of an interrupted write", size, 0)
		}
		return nil
	})
}

// recoverContinuous makes one continuous stream folder consistent and
// returns its sample count.
func (rc *recoverer) recoverContinuous(folder string, channels int) (int64, error) {
	datPath := filepath.Join(folder, "continuous.dat")
	frame := int64(2 * channels)
	fi, err := os.Stat(datPath)
	if errors.Is(err, fs.ErrNotExist) {
		// The folder was never created (or only in part): nothing to keep.
		for _, name := range []string{"sample_numbers.npy", "timestamps.npy"} {
			p := filepath.Join(folder, name)
			if nf, err := openNpy(p, knownDescr[name]); err == nil && nf != nil {
				if err := rc.cut(nf, 0, "continuous.dat is missing"); err != nil {
					return 0, err
				}
			} else if err != nil {
				return 0, err
			}
		}
		return 0, nil
	}
	if err != nil {
		return 0, fileError("read", datPath, err)
	}
	frames := fi.Size() / frame
	sn, err := openNpy(filepath.Join(folder, "sample_numbers.npy"), "<i8")
	if err != nil {
		return 0, err
	}
	ts, err := openNpy(filepath.Join(folder, "timestamps.npy"), "<f8")
	if err != nil {
		return 0, err
	}
	n := frames
	why := ""
	for _, f := range []*npyFile{sn, ts} {
		if f == nil {
			n = 0
			why = "a sample_numbers.npy or timestamps.npy is missing"
			continue
		}
		if f.rows < n {
			n = f.rows
		}
	}
	if why == "" {
		why = fmt.Sprintf("continuous.dat holds %d whole sample frames, sample_numbers.npy %d rows, timestamps.npy %d rows", frames, sn.rows, ts.rows)
	}
	// Rows whose sample number or timestamp does not increase are not
	// what the recorder wrote (a power cut can leave zero-filled blocks).
	if sn != nil && sn.h.descr == "<i8" && rc.scan != scanNone {
		if k, err := firstNotIncreasing(sn, rc.scanFrom(sn), n, false); err != nil {
			return 0, err
		} else if k < n {
			n = k
			why = fmt.Sprintf("sample number of row %d does not increase (a block the disk never received)", k)
		}
	}
	if ts != nil && ts.h.descr == "<f8" && rc.scan != scanNone {
		if k, err := firstNotIncreasing(ts, rc.scanFrom(ts), n, true); err != nil {
			return 0, err
		} else if k < n {
			n = k
			why = fmt.Sprintf("timestamp of row %d does not increase (a block the disk never received)", k)
		}
	}
	if want := n * frame; fi.Size() != want {
		if err := truncateFile(datPath, want); err != nil {
			return 0, err
		}
		partial := fi.Size() - frames*frame
		what := fmt.Sprintf("cut from %d to %d bytes: %d sample frames (%d channels) dropped", fi.Size(), want, frames-n, channels)
		if partial > 0 {
			what += fmt.Sprintf(" and %d bytes of a partial frame", partial)
		}
		rc.change(datPath, what+" — "+why, fi.Size()-want, frames-n)
	}
	for _, f := range []*npyFile{sn, ts} {
		if f != nil {
			if err := rc.cut(f, n, why); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

// scanFrom is the first row of f to check for values that do not
// increase.
func (rc *recoverer) scanFrom(f *npyFile) int64 {
	if rc.scan == scanTail {
		return f.h.count
	}
	return 0
}

// knownDescr is the dtype of the .npy files ephysd and Open Ephys write.
var knownDescr = map[string]string{
	"sample_numbers.npy": "<i8", "timestamps.npy": "<f8", "states.npy": "<i2", "full_words.npy": "<u8",
}

// npyFolders lists the folders at or below top that hold .npy files.
func npyFolders(top string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p == top {
				return fs.SkipDir
			}
			return err
		}
		if !d.IsDir() && strings.HasSuffix(d.Name(), ".npy") {
			if dir := filepath.Dir(p); !seen[dir] {
				seen[dir] = true
				out = append(out, dir)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fileError("read", top, err)
	}
	sort.Strings(out)
	return out, nil
}

// recoverGroup cuts the .npy files of an event or spike folder to the rows
// they all hold and returns that count. Event folders need
// sample_numbers.npy and timestamps.npy, TTL folders states.npy and the
// MessageCenter text.npy: without them an event has no time or label.
func (rc *recoverer) recoverGroup(folder string, events bool) (int64, error) {
	entries, err := os.ReadDir(folder)
	if err != nil {
		return 0, fileError("read", folder, err)
	}
	var files []*npyFile
	present := map[string]bool{}
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".npy") {
			continue
		}
		f, err := openNpy(filepath.Join(folder, e.Name()), knownDescr[e.Name()])
		if err != nil {
			return 0, err
		}
		if f != nil {
			files = append(files, f)
			present[e.Name()] = true
		}
	}
	var required []string
	if events {
		required = []string{"sample_numbers.npy", "timestamps.npy"}
		switch filepath.Base(folder) {
		case "TTL":
			required = append(required, "states.npy")
		case messageCenterFolder:
			required = append(required, "text.npy")
		}
	}
	n := int64(math.MaxInt64)
	var why []string
	for _, r := range required {
		if !present[r] {
			n = 0
			why = append(why, r+" is missing")
		}
	}
	for _, f := range files {
		n = min(n, f.rows)
		why = append(why, fmt.Sprintf("%s %d", filepath.Base(f.path), f.rows))
	}
	if len(files) == 0 {
		return 0, nil
	}
	reason := "rows on disk: " + strings.Join(why, ", ")
	for _, f := range files {
		if err := rc.cut(f, n, reason); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// cut makes f hold exactly n rows with a header that says so.
func (rc *recoverer) cut(f *npyFile, n int64, why string) error {
	size := f.size
	want := int64(f.h.headerLen) + n*f.h.rowSize
	claimed := f.h.count
	if size == want && claimed == n && !f.rebuild {
		return nil
	}
	var parts []string
	var bytesDropped, rowsDropped int64
	if f.rebuild {
		if err := writeEmptyNpy(f.path, f.h); err != nil {
			return err
		}
		parts = append(parts, fmt.Sprintf("incomplete header (%d bytes) rewritten for an empty %s array", size, f.h.descr))
	} else {
		if size != want {
			if err := truncateFile(f.path, want); err != nil {
				return err
			}
			bytesDropped = size - want
			rowsDropped = f.rows - n
			if rowsDropped > 0 {
				parts = append(parts, fmt.Sprintf("cut from %d to %d rows", f.rows, n))
			}
			if partial := size - int64(f.h.headerLen) - f.rows*f.h.rowSize; partial > 0 {
				parts = append(parts, fmt.Sprintf("%d bytes of a partial row dropped", partial))
			}
		}
		if claimed != n {
			if err := rewriteNpyHeader(f, n); err != nil {
				return err
			}
			parts = append(parts, fmt.Sprintf("header said %d rows, now %d", claimed, n))
		}
	}
	rc.change(f.path, strings.Join(parts, "; ")+" — "+why, bytesDropped, rowsDropped)
	return nil
}

// npyHead is a parsed .npy header.
type npyHead struct {
	major     byte
	headerLen int // bytes before the data
	descr     string
	fortran   bool
	shape     []int64
	count     int64 // shape[0]
	rowSize   int64 // bytes per row: item size × the other dimensions
}

// npyFile is a .npy file found on disk.
type npyFile struct {
	path string
	size int64
	h    npyHead
	rows int64 // whole rows on disk
	// rebuild: the header is incomplete (a process killed while creating
	// the file) and no row can follow it: rewrite it for an empty array.
	rebuild bool
}

// openNpy reads the header of the .npy file at path; nil when it does not
// exist. An incomplete header of a file whose dtype is known (descr, ""
// when it is not) is marked for rebuilding; any other bad header is an
// error.
func openNpy(path, descr string) (*npyFile, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fileError("read", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fileError("read", path, err)
	}
	head := make([]byte, min(fi.Size(), 1<<16))
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, fileError("read", path, err)
	}
	h, err := parseNpyHeader(head)
	if err != nil {
		if descr != "" && fi.Size() <= int64(npyHeaderSize(descr)) && bytes.HasPrefix([]byte(npyMagic), head[:min(len(head), len(npyMagic))]) {
			h, _ := parseNpyHeader(npyBytes(descr, 0, nil))
			return &npyFile{path: path, size: fi.Size(), h: h, rebuild: true}, nil
		}
		return nil, fmt.Errorf("recording: %s: %v — the file is not a .npy array recovery can check", path, err)
	}
	if fi.Size() < int64(h.headerLen) {
		return nil, fmt.Errorf("recording: %s: the header claims %d bytes but the file has %d", path, h.headerLen, fi.Size())
	}
	nf := &npyFile{path: path, size: fi.Size(), h: h}
	nf.rows = (fi.Size() - int64(h.headerLen)) / h.rowSize
	return nf, nil
}

// parseNpyHeader parses the magic, version and header dict of a .npy file
// that holds an array of rows (at least one dimension).
func parseNpyHeader(b []byte) (npyHead, error) {
	var h npyHead
	if len(b) < 10 || string(b[:6]) != "\x93NUMPY" {
		return h, errors.New("no .npy magic string")
	}
	h.major = b[6]
	var dict string
	switch h.major {
	case 1:
		n := int(binary.LittleEndian.Uint16(b[8:10]))
		h.headerLen = 10 + n
	case 2, 3:
		if len(b) < 12 {
			return h, errors.New("truncated header")
		}
		n := int(binary.LittleEndian.Uint32(b[8:12]))
		h.headerLen = 12 + n
	default:
		return h, fmt.Errorf(".npy format version %d is unknown", h.major)
	}
	if h.headerLen > len(b) {
		return h, errors.New("truncated header")
	}
	if h.major == 1 {
		dict = string(b[10:h.headerLen])
	} else {
		dict = string(b[12:h.headerLen])
	}
	descr, ok := pyStringValue(dict, "descr")
	if !ok {
		return h, errors.New("header has no simple 'descr' (structured dtypes are not supported)")
	}
	h.descr = descr
	fo, ok := pyRawValue(dict, "fortran_order")
	if !ok {
		return h, errors.New("header has no 'fortran_order'")
	}
	h.fortran = strings.HasPrefix(fo, "True")
	shape, err := pyShape(dict)
	if err != nil {
		return h, err
	}
	if len(shape) == 0 {
		return h, errors.New("the array is a scalar, not rows")
	}
	if h.fortran && len(shape) > 1 {
		return h, errors.New("a Fortran-ordered array of several dimensions cannot be cut by rows")
	}
	h.shape = shape
	h.count = shape[0]
	item, err := itemSize(descr)
	if err != nil {
		return h, err
	}
	h.rowSize = int64(item)
	for _, d := range shape[1:] {
		h.rowSize *= d
	}
	if h.rowSize <= 0 {
		return h, errors.New("rows of zero bytes")
	}
	return h, nil
}

// pyRawValue returns the text after 'key': in a Python dict literal.
func pyRawValue(dict, key string) (string, bool) {
	for _, q := range []string{"'", `"`} {
		if i := strings.Index(dict, q+key+q); i >= 0 {
			rest := strings.TrimLeft(dict[i+len(key)+2:], " ")
			if !strings.HasPrefix(rest, ":") {
				continue
			}
			return strings.TrimLeft(rest[1:], " "), true
		}
	}
	return "", false
}

// pyStringValue returns the string value of key in a Python dict literal.
func pyStringValue(dict, key string) (string, bool) {
	v, ok := pyRawValue(dict, key)
	if !ok || len(v) < 2 || (v[0] != '\'' && v[0] != '"') {
		return "", false
	}
	end := strings.IndexByte(v[1:], v[0])
	if end < 0 {
		return "", false
	}
	return v[1 : 1+end], true
}

// pyShape parses the shape tuple of a .npy header dict.
func pyShape(dict string) ([]int64, error) {
	v, ok := pyRawValue(dict, "shape")
	if !ok || !strings.HasPrefix(v, "(") {
		return nil, errors.New("header has no 'shape' tuple")
	}
	end := strings.IndexByte(v, ')')
	if end < 0 {
		return nil, errors.New("header's 'shape' tuple is not closed")
	}
	var shape []int64
	for _, part := range strings.Split(v[1:end], ",") {
		part = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(part), "L"))
		if part == "" {
			continue
		}
		n, err := strconv.ParseInt(part, 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("header's shape %q is not a tuple of counts", v[:end+1])
		}
		shape = append(shape, n)
	}
	return shape, nil
}

// itemSize is the size in bytes of one item of a simple numpy dtype.
func itemSize(descr string) (int, error) {
	d := strings.TrimLeft(descr, "<>|=")
	if d == "" {
		return 0, fmt.Errorf("dtype %q is not a simple dtype", descr)
	}
	kind := d[0]
	digits := d[1:]
	if i := strings.IndexByte(digits, '['); i >= 0 { // datetime units: <M8[ns]
		digits = digits[:i]
	}
	n, err := strconv.Atoi(digits)
	if err != nil {
		if kind == '?' && digits == "" {
			return 1, nil
		}
		return 0, fmt.Errorf("dtype %q is not a simple dtype", descr)
	}
	switch kind {
	case 'b', 'i', 'u', 'f', 'c', 'S', 'a', 'V', 'M', 'm':
		return n, nil
	case 'U':
		return 4 * n, nil
	}
	return 0, fmt.Errorf("dtype %q cannot be cut by rows (object or unknown kind)", descr)
}

// npyHeaderBytes renders a header like h's for count rows into exactly
// size bytes, or returns false when it does not fit.
func npyHeaderBytes(h npyHead, count int64, size int) ([]byte, bool) {
	shape := append([]int64{count}, h.shape[1:]...)
	var sh strings.Builder
	for i, d := range shape {
		if i > 0 {
			sh.WriteString(", ")
		}
		sh.WriteString(strconv.FormatInt(d, 10))
	}
	if len(shape) == 1 {
		sh.WriteString(",")
	}
	fo := "False"
	if h.fortran {
		fo = "True"
	}
	dict := "{'descr': '" + h.descr + "', 'fortran_order': " + fo + ", 'shape': (" + sh.String() + "), }"
	lenField := 2
	if h.major >= 2 {
		lenField = 4
	}
	pre := 8 + lenField
	if pre+len(dict)+1 > size {
		return nil, false
	}
	out := make([]byte, 0, size)
	out = append(out, "\x93NUMPY"...)
	out = append(out, h.major, 0)
	if lenField == 2 {
		out = binary.LittleEndian.AppendUint16(out, uint16(size-pre))
	} else {
		out = binary.LittleEndian.AppendUint32(out, uint32(size-pre))
	}
	out = append(out, dict...)
	for len(out) < size-1 {
		out = append(out, ' ')
	}
	return append(out, '\n'), true
}

// rewriteNpyHeader writes f's header for n rows in place, or, when the
// count does not fit in it, rewrites the file with a larger header.
func rewriteNpyHeader(f *npyFile, n int64) error {
	if hdr, ok := npyHeaderBytes(f.h, n, f.h.headerLen); ok {
		w, err := os.OpenFile(f.path, os.O_WRONLY, 0)
		if err != nil {
			return fileError("open", f.path, err)
		}
		if _, err := w.WriteAt(hdr, 0); err != nil {
			w.Close()
			return fileError("write header of", f.path, err)
		}
		if err := w.Sync(); err != nil {
			w.Close()
			return fileError("sync", f.path, err)
		}
		if err := w.Close(); err != nil {
			return fileError("close", f.path, err)
		}
		return nil
	}
	size := (f.h.headerLen + 64 + 63) / 64 * 64
	hdr, _ := npyHeaderBytes(f.h, n, size)
	src, err := os.Open(f.path)
	if err != nil {
		return fileError("open", f.path, err)
	}
	defer src.Close()
	tmp := f.path + ".recover"
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fileError("create", tmp, err)
	}
	_, err = dst.Write(hdr)
	if err == nil {
		_, err = io.Copy(dst, io.NewSectionReader(src, int64(f.h.headerLen), n*f.h.rowSize))
	}
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, f.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fileError("rewrite", f.path, err)
	}
	f.h.headerLen = size
	return nil
}

// writeEmptyNpy replaces the incomplete file at path with a header for an
// empty array of h's dtype.
func writeEmptyNpy(path string, h npyHead) error {
	hdr, _ := npyHeaderBytes(h, 0, h.headerLen)
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fileError("open", path, err)
	}
	if _, err := w.Write(hdr); err != nil {
		w.Close()
		return fileError("write", path, err)
	}
	if err := w.Sync(); err != nil {
		w.Close()
		return fileError("sync", path, err)
	}
	if err := w.Close(); err != nil {
		return fileError("close", path, err)
	}
	return nil
}

// firstNotIncreasing returns the first row from from to n whose value
// (int64 or float64) is not greater than the previous row's, or n.
func firstNotIncreasing(f *npyFile, from, n int64, float bool) (int64, error) {
	row := max(from-1, 0)
	if n-row < 2 {
		return n, nil
	}
	r, err := os.Open(f.path)
	if err != nil {
		return 0, fileError("read", f.path, err)
	}
	defer r.Close()
	buf := make([]byte, 1<<20)
	sr := io.NewSectionReader(r, int64(f.h.headerLen)+row*8, (n-row)*8)
	first := row
	var prevI int64
	var prevF float64
	for row < n {
		k, err := io.ReadFull(sr, buf[:min(int64(len(buf)), (n-row)*8)])
		if err != nil && k == 0 {
			return 0, fileError("read", f.path, err)
		}
		for i := 0; i+8 <= k; i += 8 {
			u := binary.LittleEndian.Uint64(buf[i:])
			if float {
				v := math.Float64frombits(u)
				if row > first && !(v > prevF) {
					return row, nil
				}
				prevF = v
			} else {
				v := int64(u)
				if row > first && v <= prevI {
					return row, nil
				}
				prevI = v
			}
			row++
		}
	}
	return n, nil
}

// truncateFile cuts the file at path to size bytes and syncs it.
func truncateFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fileError("open", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fileError("truncate", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fileError("sync", path, err)
	}
	if err := f.Close(); err != nil {
		return fileError("close", path, err)
	}
	return nil
}

// writeOebinRecovered replaces structure.oebin. When the disk is too full
// for the temporary file of an atomic replacement, it writes the file in
// place: the marker stays until it is complete, so a crash meanwhile is
// recovered again.
func writeOebinRecovered(path string, data []byte) error {
	err := writeFileAtomic(path, data)
	if err == nil || !(errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)) {
		return err
	}
	f, oerr := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if oerr != nil {
		return err
	}
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("%w (and writing it in place failed too: %v) — free some space and run `ephysd recover` again", err, werr)
	}
	return nil
}

// syncDir makes the entries of a folder durable (best effort).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// datBytes is the total size of the continuous.dat files below dir (0 if
// it is missing).
func datBytes(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() == "continuous.dat" {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func relOrSelf(base, p string) string {
	if r, err := filepath.Rel(base, p); err == nil {
		return r
	}
	return p
}

// jsonField is one member of a JSON object, in document order.
type jsonField struct {
	Key   string
	Value json.RawMessage
}

// decodeObject decodes a JSON object keeping its members' order.
func decodeObject(data []byte) ([]jsonField, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var out []jsonField
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		out = append(out, jsonField{key, v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return out, nil
}

// encodeObject renders fields as structure.oebin is written: indented by
// two spaces, ending in a newline.
func encodeObject(fields []jsonField) ([]byte, error) {
	var c bytes.Buffer
	c.WriteByte('{')
	for i, f := range fields {
		if i > 0 {
			c.WriteByte(',')
		}
		k, _ := json.Marshal(f.Key)
		c.Write(k)
		c.WriteByte(':')
		c.Write(f.Value)
	}
	c.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, c.Bytes(), "", "  "); err != nil {
		return nil, err
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// arrayField returns the elements of the array member key (none when it
// is missing or null).
func arrayField(fields []jsonField, key string) ([]json.RawMessage, error) {
	for _, f := range fields {
		if f.Key == key {
			var a []json.RawMessage
			if err := json.Unmarshal(f.Value, &a); err != nil {
				return nil, fmt.Errorf("%q is not an array", key)
			}
			return a, nil
		}
	}
	return nil, nil
}

// setField returns fields with member key set to the array a (added at
// the end when missing).
func setField(fields []jsonField, key string, a []json.RawMessage) []jsonField {
	var v bytes.Buffer
	v.WriteByte('[')
	for i, e := range a {
		if i > 0 {
			v.WriteByte(',')
		}
		v.Write(e)
	}
	v.WriteByte(']')
	out := append([]jsonField(nil), fields...)
	for i := range out {
		if out[i].Key == key {
			out[i].Value = v.Bytes()
			return out
		}
	}
	return append(out, jsonField{key, v.Bytes()})
}

// entryFolder is the folder of an event or spike entry of structure.oebin
// (folder_name, or folder for spikes), without the trailing slash.
func entryFolder(raw json.RawMessage) string {
	var e struct {
		FolderName string `json:"folder_name"`
		Folder     string `json:"folder"`
	}
	_ = json.Unmarshal(raw, &e)
	name := e.FolderName
	if name == "" {
		name = e.Folder
	}
	return strings.TrimSuffix(name, "/")
}

// mergeEntries adds to the array key of desc the entries of old's whose
// folder desc does not list.
func mergeEntries(desc, old []jsonField, key string) []jsonField {
	a, err := arrayField(desc, key)
	if err != nil {
		return desc
	}
	b, err := arrayField(old, key)
	if err != nil || len(b) == 0 {
		return desc
	}
	have := map[string]bool{}
	for _, e := range a {
		have[entryFolder(e)] = true
	}
	added := false
	for _, e := range b {
		if f := entryFolder(e); f != "" && !have[f] {
			a = append(a, e)
			have[f] = true
			added = true
		}
	}
	if !added {
		return desc
	}
	return setField(desc, key, a)
}

// sameJSON reports whether a and b are the same JSON text but for
// whitespace.
func sameJSON(a, b []byte) bool {
	if bytes.Equal(a, b) {
		return true
	}
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

func compactJSON(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

// processRunning reports whether the process pid that wrote a marker
// still runs: same boot, and a process of that pid started at the same
// time (a pid reused by another process does not count). This process
// never counts: it has not written the marker it is recovering.
func processRunning(pid int, bootID string, start uint64) bool {
	if pid == os.Getpid() {
		return false
	}
	if bootID != "" && bootID != currentBootID() {
		return false
	}
	s, ok := processStartTime(pid)
	return ok && (start == 0 || s == start)
}

// currentBootID is the kernel's boot id ("" if unknown).
func currentBootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// processStartTime is field 22 of /proc/<pid>/stat: when the process
// started, in clock ticks since boot.
func processStartTime(pid int) (uint64, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command may hold spaces
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 { // fields from 3 on
		return 0, false
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	return v, err == nil
}
