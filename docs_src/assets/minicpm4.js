// Wrap every notebook cell tagged `solution` (nbconvert gives it the class celltag_solution) in a closed
// <details>, so a student sees the exercise first and opens the solution on purpose.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".celltag_solution").forEach(function (cell) {
    if (cell.parentElement && cell.parentElement.classList.contains("solution")) return;
    var d = document.createElement("details");
    d.className = "solution";
    var s = document.createElement("summary");
    s.textContent = "Solution";
    d.appendChild(s);
    cell.parentNode.insertBefore(d, cell);
    d.appendChild(cell);
  });
});
