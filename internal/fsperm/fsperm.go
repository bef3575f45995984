// Package fsperm checks that a file or directory pcpd trusts (its control
// socket's directory, its state directory, its config file) cannot be
// changed by another local user.
package fsperm

import "errors"

// ErrUnsafe: the path, or a directory above it, can be changed by a user
// other than root and pcpd's own.
var ErrUnsafe = errors.New("writable by other users")
