package recording

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// DefaultRecordNodeID is the record node id Open Ephys gives its first
// Record Node, used when none is configured.
const DefaultRecordNodeID = 101

// sessionDirLayout is the name of a session folder, as Open Ephys names it.
const sessionDirLayout = "2006-01-02_15-04-05"

// Session decides where recordings go and how they are numbered, the way the
// Open Ephys GUI does: one dated folder per session, experiment numbers that
// increase when acquisition stops after a recording, recording numbers that
// increase with each record start and restart at 1 in a new experiment.
//
// A Session is safe for concurrent use.
type Session struct {
	parent string
	nodeID int
	now    func() time.Time

	mu            sync.Mutex
	naming        Naming
	dir           string // the dated folder; "" until the next record start makes one
	experiment    int
	number        int
	recordedInExp bool // something was recorded in the current experiment
	newExperiment bool // the next record start opens a new experiment
}

// NewSession returns a session that makes its dated folder in parentDir at
// its first record start. recordNodeID 0 means DefaultRecordNodeID; now nil
// means time.Now.
func NewSession(parentDir string, recordNodeID int, now func() time.Time) *Session {
	if recordNodeID == 0 {
		recordNodeID = DefaultRecordNodeID
	}
	if now == nil {
		now = time.Now
	}
	return &Session{parent: parentDir, nodeID: recordNodeID, now: now}
}

// Naming is how Open Ephys names a session folder: <Parent>/<Prepend><Base><Append>,
// an empty Base meaning the date and time of the first record start
// (YYYY-MM-DD_HH-MM-SS).
type Naming struct {
	Parent, Prepend, Base, Append string
}

// Naming returns the current naming.
func (s *Session) Naming() Naming {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.naming
	n.Parent = s.parent
	return n
}

// SetNaming changes the parent folder and the name parts. A change takes
// effect at the next record start, which then makes a new folder (a folder
// in use is never renamed).
func (s *Session) SetNaming(n Naming) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n.Parent == "" {
		n.Parent = s.parent
	}
	old := s.naming
	old.Parent = s.parent
	if n == old {
		return
	}
	s.parent = n.Parent
	n.Parent = ""
	s.naming = n
	s.dir = ""
	s.recordedInExp = false
	s.newExperiment = false
}

// RecordNodeID is the record node id of the session's recordings.
func (s *Session) RecordNodeID() int { return s.nodeID }

// Dir is the session's dated folder, or "" before the first record start
// (and after StartNewDirectory, until the next one).
func (s *Session) Dir() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dir
}

// Next returns the recording for the next record start. The first record
// start of the session (or the first after StartNewDirectory) creates the
// dated folder <parent>/<YYYY-MM-DD_HH-MM-SS>; when a folder of that name
// already exists a suffix _2, _3, … is added rather than writing into it.
func (s *Session) Next() (*pipeline.Recording, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dir == "" {
		base := s.naming.Base
		if base == "" {
			base = s.now().Format(sessionDirLayout)
		}
		dir, err := makeSessionDir(s.parent, s.naming.Prepend+base+s.naming.Append)
		if err != nil {
			return nil, err
		}
		s.dir = dir
		s.experiment, s.number = 1, 0
		s.newExperiment = false
	} else if s.newExperiment {
		s.experiment++
		s.number = 0
		s.newExperiment = false
	}
	s.number++
	s.recordedInExp = true
	return &pipeline.Recording{Dir: s.dir, Experiment: s.experiment, Number: s.number}, nil
}

// AcquisitionStopped tells the session that acquisition stopped: if anything
// was recorded in the current experiment, the next record start begins a new
// experiment (and recording numbers restart at 1).
func (s *Session) AcquisitionStopped() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.recordedInExp {
		s.newExperiment = true
		s.recordedInExp = false
	}
}

// StartNewDirectory makes the next record start create a new dated folder,
// with experiment and recording numbers starting again at 1.
func (s *Session) StartNewDirectory() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dir = ""
	s.recordedInExp = false
	s.newExperiment = false
}

// makeSessionDir creates parent/name, or parent/name_2, name_3, … when that
// exists: a folder someone else made is never reused.
func makeSessionDir(parent, name string) (string, error) {
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return "", fileError("create recording folder", parent, err)
	}
	for i := 1; i <= 1000; i++ {
		dir := filepath.Join(parent, name)
		if i > 1 {
			dir += "_" + strconv.Itoa(i)
		}
		err := os.Mkdir(dir, 0o755)
		if err == nil {
			return dir, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return "", fileError("create session folder", dir, err)
		}
	}
	return "", fmt.Errorf("recording: create session folder in %s: %s and 999 numbered variants already exist", parent, name)
}

// RecordingPath is the folder of recording r written by record node
// recordNodeID: <Dir>/Record Node <id>/experiment<E>/recording<N>.
// recordNodeID 0 means DefaultRecordNodeID.
func RecordingPath(r *pipeline.Recording, recordNodeID int) string {
	return filepath.Join(recordNodePath(r.Dir, recordNodeID),
		"experiment"+strconv.Itoa(r.Experiment), "recording"+strconv.Itoa(r.Number))
}

// recordNodePath is the record node folder of a session folder.
func recordNodePath(dir string, recordNodeID int) string {
	if recordNodeID == 0 {
		recordNodeID = DefaultRecordNodeID
	}
	return filepath.Join(dir, "Record Node "+strconv.Itoa(recordNodeID))
}
