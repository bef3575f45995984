//go:build !linux

package bootclock

import (
	"errors"
	"time"
)

func boottime() (time.Duration, error) { return 0, errors.New("no CLOCK_BOOTTIME") }
