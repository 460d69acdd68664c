// The API key both pages send as "Authorization: Bearer KEY", kept in this browser only.
const KEY_STORAGE = "sdxl-api-key";

function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function storeKey(key) {
  localStorage.setItem(KEY_STORAGE, key.trim());
}

function authHeaders() {
  const key = storedKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// Wire a key form: fill it from storage, store on submit, then call onChange.
function bindKeyForm(form, input, onChange) {
  input.value = storedKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(input.value);
    onChange();
  });
}
