// Package fuzz holds pcpd's fuzz targets (testing.F) and their committed
// seed corpora under testdata/fuzz/<Target>/. It has no non-test code;
// see README.md for the targets and the command CI runs for each.
package fuzz
