package bootclock

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// boottime reads CLOCK_BOOTTIME: time since boot, suspend included, never
// stepped; as the host counts it. In a time namespace (Linux 5.6, unshare
// --time, a container's or a CRIU restore's) the clock reads the host's
// plus the namespace's boottime offset, and the boot id is the host's: a
// pcpd started in another namespace than the last run's, in the same
// boot, read the difference of the offsets as a step (review h/revboot,
// TestTimeNamespace). unshare --boottime 100000: a step back of 27.8 h,
// so the start restored in a frame 27.8 h ahead: every lease expired and
// dropped, its pinhole deleted, while the store's clock-doubt check let
// the epoch go on, 27.8 h higher (issue 9: empty while claiming
// continuity). An offset the other way read as a step forward (leases
// longer, expired ones back) or as a damaged anchor. So the offset is
// taken off.
func boottime() (time.Duration, error) {
	off, err := timensOffset()
	if err != nil {
		return 0, err
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, err
	}
	return time.Duration(ts.Nano()) - off, nil
}

// timensOffset is this process's time namespace's boottime offset
// (/proc/self/timens_offsets; none without time namespaces). A process's
// namespace is fixed once it has threads, so it is read once.
var timensOffset = sync.OnceValues(func() (time.Duration, error) {
	return readTimensOffset("/proc/self/timens_offsets")
})

func readTimensOffset(path string) (time.Duration, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil // a kernel without time namespaces
	}
	if err != nil {
		return 0, fmt.Errorf("time namespace offsets: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) != 3 || (fl[0] != "boottime" && fl[0] != strconv.Itoa(unix.CLOCK_BOOTTIME)) {
			continue
		}
		sec, err1 := strconv.ParseInt(fl[1], 10, 64)
		nsec, err2 := strconv.ParseInt(fl[2], 10, 64)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("time namespace offsets: %q", sc.Text())
		}
		return time.Duration(sec)*time.Second + time.Duration(nsec), nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("time namespace offsets: %w", err)
	}
	return 0, fmt.Errorf("time namespace offsets: no boottime line in %s", path)
}
