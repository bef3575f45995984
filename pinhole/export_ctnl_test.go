package pinhole

import "github.com/pcpd/pcpd/internal/ctnl"

// The dump's decoding moved to internal/ctnl; TestCtMessagesDoneWithError
// checks it here under its former names.
type ctFlow = ctnl.Flow

var ctMessages = ctnl.Messages
