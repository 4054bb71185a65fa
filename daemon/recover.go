package daemon

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/recording"
)

// recoverCommand is `ephysd recover DIR...`: it makes every recording at
// or below each DIR consistent (recording.Recover) and prints what it
// changed. It fails when a recording could not be fixed.
func recoverCommand(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("ephysd recover", stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: ephysd recover DIR...\n\n"+recoverHelp)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageError{errors.New("recover: give the recording folders to check (a recording, experiment, Record Node or session folder, or the folder above the sessions)")}
	}
	var failed []string
	var checked, fixed, unfinished int
	var records, bytes int64
	for _, dir := range fs.Args() {
		rep, err := recording.Recover(dir)
		if err != nil {
			fmt.Fprintf(stderr, "ephysd: recover: %v\n", err)
			failed = append(failed, dir)
			continue
		}
		fmt.Fprint(stdout, rep.String())
		for _, rr := range rep.Recordings {
			checked++
			if rr.Unfinished {
				unfinished++
			}
			if rr.Err != nil {
				failed = append(failed, rr.Dir)
				continue
			}
			if len(rr.Changes) > 0 || rr.Unfinished {
				fixed++
			}
			for _, c := range rr.Changes {
				records += c.RecordsDropped
				bytes += c.BytesDropped
			}
		}
	}
	fmt.Fprintf(stdout, "%d recordings checked: %d not finalised, %d fixed (%d records and %d bytes that were not whole dropped), %d could not be fixed\n",
		checked, unfinished, fixed, records, bytes, len(failed))
	if len(failed) > 0 {
		return fmt.Errorf("recover: could not fix %s (see above for why)", strings.Join(failed, ", "))
	}
	return nil
}

const recoverHelp = `Makes recordings consistent after ephysd was killed, crashed, lost power or ran
out of disk space: cuts continuous.dat and the .npy files to the samples and
events they all hold, rewrites the .npy headers and structure.oebin to match,
and removes the "not finalised" marker. It never invents or changes a sample;
it drops only what is not whole. A finished recording is left unchanged.
ephysd run does the same for the unfinished recordings below its recording
folders when it starts.
`

// recoveryRoots are the folders whose unfinished recordings the daemon
// recovers at start: the recording parent folder and the folders the API
// may record into, without folders inside others.
func recoveryRoots(cfg *Config) []string {
	all := append([]string{cfg.Recording.ParentDirectory}, cfg.Control.RecordingDirs...)
	for i, d := range all {
		all[i] = filepath.Clean(d)
	}
	sort.Strings(all)
	var roots []string
	for _, d := range all {
		if len(roots) > 0 {
			last := roots[len(roots)-1]
			if d == last || strings.HasPrefix(d, last+string(filepath.Separator)) {
				continue
			}
		}
		roots = append(roots, d)
	}
	return roots
}

// recoverAtStart recovers the recordings an earlier ephysd left
// unfinished (killed, crashed, power cut) below the recording folders,
// and logs what it changed. A recording it cannot fix is logged and left
// for `ephysd recover`: it does not keep the daemon from starting.
func recoverAtStart(cfg *Config, log *zap.Logger) {
	for _, root := range recoveryRoots(cfg) {
		rep, err := recording.RecoverUnfinished(root)
		if err != nil {
			log.Error("could not look for unfinished recordings", zap.String("folder", root), zap.Error(err))
			continue
		}
		for _, rr := range rep.Recordings {
			if rr.Err != nil {
				log.Error("an unfinished recording could not be recovered: fix what the error says, then run `ephysd recover` on it",
					zap.String("recording", rr.Dir), zap.Error(rr.Err))
				continue
			}
			var records, bytes int64
			changes := make([]string, 0, len(rr.Changes))
			for _, c := range rr.Changes {
				records += c.RecordsDropped
				bytes += c.BytesDropped
				rel, err := filepath.Rel(rr.Dir, c.Path)
				if err != nil {
					rel = c.Path
				}
				changes = append(changes, rel+": "+c.What)
			}
			log.Warn("recovered a recording that ephysd did not finalise (killed, crashed or power cut)",
				zap.String("recording", rr.Dir), zap.Int("files_fixed", len(rr.Changes)),
				zap.Int64("records_dropped", records), zap.Int64("bytes_dropped", bytes),
				zap.Strings("changes", changes), zap.Strings("warnings", rr.Warnings))
		}
	}
}
