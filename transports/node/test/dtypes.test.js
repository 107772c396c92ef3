// Item sizes of the ndarray dtypes PROTOCOL.md §7 lists, datetime64/timedelta64 included.
import assert from "node:assert/strict";
import { test } from "node:test";
import { DecodeError, dtypeItemsize } from "../sagezmq.js";

test("datetime64 and timedelta64 are 8-byte counts, whatever the unit", () => {
  for (const d of ["<M8[ns]", ">M8[D]", "<m8[s]", "<M8[10ms]", "<M8", "<m8[Y]", "<M8[us]"]) {
    assert.equal(dtypeItemsize(d), 8, d);
  }
  assert.equal(dtypeItemsize([["t", "<M8[ns]"], ["v", "<f4"]]), 12);
});

test("a unit the protocol does not define is refused", () => {
  for (const d of ["<M8[xs]", "<M4[ns]", "<M8[ns"]) {
    assert.throws(() => dtypeItemsize(d), DecodeError, d);
  }
});
