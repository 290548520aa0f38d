-- Admits a first admission and, only if it was admitted, a second, in one atomic call: a request counted
-- against its request limits, then its tokens held. Each is admit.lua's, run by the function `admit`
-- (windows.py puts admit.lua before this as that function).
--
-- KEYS: the first's keys, then the second's
-- ARGV: the first's key count, the first's argument count, the first's ARGV, then the second's ARGV
-- Returns: {the first's reply} when it was refused, else {the first's reply, the second's reply}

local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local k1, a1, k2, a2 = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= nk then k1[#k1 + 1] = KEYS[i] else k2[#k2 + 1] = KEYS[i] end
end
for i = 3, #ARGV do
  if i <= 2 + na then a1[#a1 + 1] = ARGV[i] else a2[#a2 + 1] = ARGV[i] end
end
local first = admit(k1, a1)
if first[1] == 0 then return {first} end
return {first, admit(k2, a2)}
